// The TIS FIFO register file (TCG PC Client PTP, FIFO interface) for five localities, with
// its state machine (locality arbitration: localities.ts). The chip behind it is injected
// (`TisChip`), so the register file knows nothing of what runs the commands; the chip runs
// them off this thread, which is why STS reads keep answering while a CreatePrimary is in
// execution.
import { failureResponse, parseHeader, TPM_HEADER_SIZE } from '../tpm/command.ts';
import {
  DID_VID_VALUE,
  INT,
  INTERFACE_ID_VALUE,
  INTF_CAPABILITY_VALUE,
  LOCALITIES,
  REG,
  RID_VALUE,
  STS,
  TIS_BUFFER_SIZE,
  registerAt,
} from './regs.ts';
import type { TisChip } from './chip.ts';
import type { IrqLine, Mmio } from './mmio.ts';
import { TisInterrupts } from './interrupts.ts';
import { Localities } from './localities.ts';

export type { IrqLine, Mmio, TisChip };

export type TisState = 'idle' | 'ready' | 'reception' | 'execution' | 'completion';

export interface TisModelOptions {
  /** Largest burstCount the model reports (bytes per burst). */
  maxBurst?: number;
  /** How long the model waits on the chip before asking it to cancel (and waiting on). */
  chipTimeoutMs?: number;
}

const EMPTY = new Uint8Array(0);
const FAILURE = failureResponse('2.0');

export class TisModel implements Mmio {
  state: TisState = 'idle';
  private readonly ints = new TisInterrupts();
  private readonly locs = new Localities({ lost: () => this.abort(), granted: (loc) => this.ints.raise(loc, INT.localityChange) });
  private readonly cmd = new Uint8Array(TIS_BUFFER_SIZE);
  private cmdLen = 0;
  private resp: Uint8Array = EMPTY;
  private respOff = 0;
  private execLocality = 0;
  private chipBusy = false; // the chip still runs a command (perhaps one we aborted)
  private aborted = false; // drop the running command's response
  private readyPending = false; // commandReady asked while an aborted command winds down
  private closed = false;
  private watching = false;
  private readonly maxBurst: number;
  private readonly chipTimeoutMs: number;
  readonly irq: IrqLine = { wait: (ms) => this.waitIrq(ms) };

  constructor(
    private readonly chip: TisChip,
    opts: TisModelOptions = {},
  ) {
    this.maxBurst = Math.min(Math.max(opts.maxBurst ?? 64, 1), 0xffff);
    this.chipTimeoutMs = opts.chipTimeoutMs ?? 120_000;
  }

  /** Active locality, -1 when none. */
  get active(): number {
    return this.locs.active;
  }

  read8(addr: number): number {
    return this.read(addr, 1);
  }
  read16(addr: number): number {
    return this.read(addr, 2);
  }
  read32(addr: number): number {
    return this.read(addr, 4);
  }
  write8(addr: number, value: number): void {
    this.write(addr, 1, value);
  }
  write16(addr: number, value: number): void {
    this.write(addr, 2, value);
  }
  write32(addr: number, value: number): void {
    this.write(addr, 4, value);
  }

  readBytes(addr: number, into: Uint8Array): void {
    const loc = addr >>> 12;
    const base = registerAt(addr & 0xfff);
    if ((base === REG.DATA_FIFO || base === REG.XDATA_FIFO) && loc === this.active && this.state === 'completion') {
      const n = Math.min(into.length, this.resp.length - this.respOff);
      // Short copies by hand: a set() from a shared-memory view costs more than a loop here.
      const src = this.resp;
      const off = this.respOff;
      if (n <= 64) for (let i = 0; i < n; i++) into[i] = src[off + i]!;
      else into.set(src.subarray(off, off + n));
      this.respOff += n;
      if (n < into.length) into.fill(0xff, n);
      return;
    }
    for (let i = 0; i < into.length; i++) into[i] = this.read(addr, 1);
  }

  writeBytes(addr: number, from: Uint8Array): void {
    const loc = addr >>> 12;
    const base = registerAt(addr & 0xfff);
    if ((base === REG.DATA_FIFO || base === REG.XDATA_FIFO) && loc === this.active && (this.state === 'ready' || this.state === 'reception')) {
      if (this.state === 'ready') {
        this.state = 'reception';
        this.cmdLen = 0;
      }
      // Byte by byte only until the header is in, then one copy of what fits.
      let i = 0;
      while (i < from.length && this.cmdLen < TPM_HEADER_SIZE) this.cmd[this.cmdLen++] = from[i++]!;
      const n = Math.min(from.length - i, Math.max(this.expectedSize() - this.cmdLen, 0));
      this.cmd.set(from.subarray(i, i + n), this.cmdLen);
      this.cmdLen += n;
      return;
    }
    for (let i = 0; i < from.length; i++) this.write(addr, 1, from[i]!);
  }

  /** Stop: the chip is closed (its state saved by its owner), waiters see no interrupt. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.ints.drop();
    await this.chip.close();
  }

  private read(addr: number, size: number): number {
    const loc = addr >>> 12;
    const off = addr & 0xfff;
    if (loc >= LOCALITIES) return size === 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    const base = registerAt(off);
    if (base === REG.DATA_FIFO || base === REG.XDATA_FIFO) {
      let v = 0;
      for (let i = 0; i < size; i++) v |= this.fifoRead(loc) << (8 * i);
      return v >>> 0;
    }
    if (base === off && base >= 0) return this.mask(this.regValue(loc, base), size);
    // An access not aligned on its register (STS+1 for burstCount): byte by byte.
    let v = 0;
    for (let i = 0; i < size; i++) {
      const b = registerAt(off + i);
      const byte = b < 0 ? 0 : (this.regValue(loc, b) >>> (8 * (off + i - b))) & 0xff;
      v |= byte << (8 * i);
    }
    return v >>> 0;
  }

  private mask(v: number, size: number): number {
    return size === 4 ? v >>> 0 : v & ((1 << (8 * size)) - 1);
  }

  private write(addr: number, size: number, value: number): void {
    const loc = addr >>> 12;
    const off = addr & 0xfff;
    if (loc >= LOCALITIES || this.closed) return;
    const base = registerAt(off);
    if (base < 0) return;
    if (base === REG.DATA_FIFO || base === REG.XDATA_FIFO) {
      for (let i = 0; i < size; i++) this.fifoWrite(loc, (value >>> (8 * i)) & 0xff);
      return;
    }
    const shift = 8 * (off - base);
    const bytes = size === 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    this.regWrite(loc, base, (value << shift) >>> 0, (bytes << shift) >>> 0);
  }

  private regValue(loc: number, base: number): number {
    switch (base) {
      case REG.ACCESS:
        return this.locs.access(loc);
      case REG.INT_ENABLE:
      case REG.INT_VECTOR:
      case REG.INT_STATUS:
        return this.ints.read(loc, base)!;
      case REG.INTF_CAPABILITY:
        return INTF_CAPABILITY_VALUE;
      case REG.STS:
        return this.stsValue(loc);
      case REG.INTERFACE_ID:
        return INTERFACE_ID_VALUE;
      case REG.DID_VID:
        return DID_VID_VALUE;
      case REG.RID:
        return RID_VALUE;
      default:
        return 0;
    }
  }

  private stsValue(loc: number): number {
    // Registers of a locality that is not active float high, as on the bus.
    if (loc !== this.active) return 0xffffffff;
    if (this.chipBusy) this.collect();
    let v = STS.stsValid | STS.selfTestDone | (STS.familyTpm2 << STS.familyShift);
    let burst = 0;
    switch (this.state) {
      case 'ready':
        v |= STS.commandReady;
        burst = this.maxBurst;
        break;
      case 'reception': {
        // Expect stays set until the size field of the header has been reached.
        if (!this.received()) {
          v |= STS.expect;
          burst = Math.min(this.maxBurst, TIS_BUFFER_SIZE - this.cmdLen);
        }
        break;
      }
      case 'completion': {
        const left = this.resp.length - this.respOff;
        if (left > 0) v |= STS.dataAvail;
        burst = Math.min(this.maxBurst, left);
        break;
      }
      default:
        break;
    }
    return (v | (burst << STS.burstShift)) >>> 0;
  }

  /** The header's size field once the header is in, clamped to what the buffer holds (a
   *  lying size cannot overrun; the TPM answers it). No command is shorter than its header,
   *  so waiting for all of it before reading the size changes nothing a driver sees. */
  private expectedSize(): number {
    if (this.cmdLen < TPM_HEADER_SIZE) return TIS_BUFFER_SIZE;
    const size = parseHeader(this.cmd.subarray(0, TPM_HEADER_SIZE), 'command', { whole: false }).size;
    return Math.min(Math.max(size, TPM_HEADER_SIZE), TIS_BUFFER_SIZE);
  }

  private received(): boolean {
    return this.cmdLen >= TPM_HEADER_SIZE && this.cmdLen >= this.expectedSize();
  }

  private regWrite(loc: number, base: number, v: number, mask: number): void {
    if (base === REG.ACCESS) return this.locs.write(loc, v & 0xff);
    // Everything else belongs to the active locality only; other localities' writes vanish.
    if (loc !== this.active) return;
    if (base === REG.STS) return this.stsWrite(v & mask);
    this.ints.write(loc, base, v, mask); // the rest is read-only
  }

  private stsWrite(v: number): void {
    if (v & STS.commandReady) {
      switch (this.state) {
        case 'idle':
          if (this.chipBusy) this.readyPending = true;
          else this.enterReady();
          break;
        case 'reception':
        case 'completion':
          this.abort();
          this.enterReady();
          break;
        case 'execution':
          // Abort: the chip is told to cancel; ready comes once it has stopped.
          this.abort();
          this.readyPending = true;
          break;
        default:
          break;
      }
    }
    if (v & STS.tpmGo && this.state === 'reception' && this.received()) this.execute();
    if (v & STS.responseRetry && this.state === 'completion') this.respOff = 0;
    if (v & STS.commandCancel && this.state === 'execution') this.chip.cancel();
  }

  private enterReady(): void {
    this.state = 'ready';
    this.cmdLen = 0;
    this.resp = EMPTY;
    this.readyPending = false;
    if (this.active >= 0) this.ints.raise(this.active, INT.commandReady);
  }

  /** Drop the command in reception or execution, or an unread response; back to idle. */
  private abort(): void {
    if (this.state === 'execution') {
      this.aborted = true;
      this.chip.cancel();
    }
    this.state = 'idle';
    this.cmdLen = 0;
    this.resp = EMPTY;
    this.respOff = 0;
  }

  private fifoWrite(loc: number, b: number): void {
    if (loc !== this.active) return;
    if (this.state === 'ready') {
      this.state = 'reception';
      this.cmdLen = 0;
    }
    // Outside reception, or once the whole command is in, FIFO writes are ignored.
    if (this.state !== 'reception' || this.received() || this.cmdLen >= TIS_BUFFER_SIZE) return;
    this.cmd[this.cmdLen++] = b;
  }

  private fifoRead(loc: number): number {
    if (loc !== this.active || this.state !== 'completion' || this.respOff >= this.resp.length) return 0xff;
    return this.resp[this.respOff++]!;
  }

  private execute(): void {
    this.state = 'execution';
    this.execLocality = this.active;
    this.chipBusy = true;
    try {
      this.chip.submit(this.cmd.subarray(0, this.cmdLen), this.execLocality);
    } catch {
      // A chip that cannot take the command answers TPM_RC_FAILURE, as a broken chip would.
      this.finish(FAILURE);
    }
  }

  /** Wait (off the register path) for the chip, so completion raises dataAvail on its own.
   *  Armed when someone waits on the interrupt line: a driver that finds dataAvail by
   *  reading STS costs no cross-thread wake-up. */
  private watch(): void {
    if (this.watching || !this.chipBusy || this.closed) return;
    this.watching = true;
    this.chip.whenDone(this.chipTimeoutMs).then(
      () => {
        this.watching = false;
        if (this.closed || this.collect()) return;
        this.chip.cancel();
        this.watch();
      },
      () => {
        this.watching = false;
        this.finish(FAILURE);
      },
    );
  }

  /** Take the chip's response if it has one; true when the chip is no longer busy. */
  private collect(): boolean {
    if (!this.chipBusy) return true;
    const r = this.chip.poll();
    if (r === undefined) return false;
    this.finish(r);
    return true;
  }

  private finish(r: Uint8Array): void {
    this.chipBusy = false;
    if (this.aborted) {
      this.aborted = false;
      if (this.readyPending) this.enterReady();
      return;
    }
    this.state = 'completion';
    this.resp = r;
    this.respOff = 0;
    this.ints.raise(this.execLocality, INT.dataAvail | INT.stsValid);
  }

  private waitIrq(timeoutMs: number): Promise<boolean> {
    if (this.closed) return Promise.resolve(false);
    if (this.chipBusy) this.collect();
    if (this.ints.asserted()) return Promise.resolve(true);
    this.watch();
    return this.ints.wait(timeoutMs);
  }
}
