// The driver side of the TIS FIFO interface, following Linux's tpm_tis_core (and mini-os'
// tpm_tis): request the locality, commandReady, write in burstCount chunks checking Expect,
// tpmGo, wait for dataAvail, read burst chunks until drained, commandReady, release.
// Waits use the interrupt line when there is one (no sleeping poll loop), after a short
// bounded spin on STS that catches fast commands without an event-loop round trip.
import { parseHeader, TPM_HEADER_SIZE } from '../tpm/command.ts';
import { VtpmError } from '../base/errors.ts';
import { commandDurationMs } from '../tpm/durations.ts';
import { CommandQueue } from '../tpm/serial.ts';
import type { HardwareTpm } from '../tpm/transport.ts';
import type { IrqLine, Mmio } from './mmio.ts';
import { ACCESS, INT, INTF_CAPABILITY_VALUE, LOCALITY_STRIDE, REG, STS, TIMEOUT, TIS_BUFFER_SIZE } from './regs.ts';

export interface TisDriverOptions {
  /** Default locality for commands (0, the OS's). */
  locality?: number;
  /** The interrupt line; without it the driver polls STS (yielding between reads). */
  irq?: IrqLine;
  /** How long to spin on STS before waiting on the interrupt (µs). */
  spinUs?: number;
  description?: string;
  onClose?: () => Promise<void>;
  /** Override the command duration (ms) the driver allows (default: the command core's,
   *  by tag and command code, as Linux does). */
  durationMs?: (commandCode: number) => number;
}

export class TisDriver implements HardwareTpm {
  readonly description: string;
  private readonly locality: number;
  private readonly spinNs: bigint;
  private readonly irq: IrqLine | undefined;
  private readonly queue = new CommandQueue();
  private closed = false;
  private readonly header = new Uint8Array(TPM_HEADER_SIZE);

  constructor(
    private readonly mmio: Mmio,
    private readonly opts: TisDriverOptions = {},
  ) {
    this.locality = opts.locality ?? 0;
    this.spinNs = BigInt(opts.spinUs ?? 20) * 1000n;
    this.description = opts.description ?? 'TIS FIFO TPM';
    // Interrupts only if the chip claims them (INTF_CAPABILITY), as Linux probes.
    const caps = mmio.read32(REG.INTF_CAPABILITY);
    this.irq = opts.irq && (caps & INT.all) === (INTF_CAPABILITY_VALUE & INT.all) ? opts.irq : undefined;
  }

  /** One command at a time, in order, as the single-threaded TIS interface requires. */
  transmit(command: Uint8Array, locality = this.locality): Promise<Uint8Array> {
    if (this.closed) return Promise.reject(new VtpmError('ECLOSED', 'TIS driver is closed'));
    return this.queue.run(() => this.send(command, locality));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue.idle();
    await this.opts.onClose?.();
  }

  private async send(cmd: Uint8Array, loc: number): Promise<Uint8Array> {
    if (loc < 0 || loc > 4) throw new VtpmError('EINVAL', `locality ${loc} is not 0..4`);
    if (cmd.length < TPM_HEADER_SIZE || cmd.length > TIS_BUFFER_SIZE) {
      throw new VtpmError('EINVAL', `command of ${cmd.length} bytes (10..${TIS_BUFFER_SIZE})`);
    }
    const base = loc * LOCALITY_STRIDE;
    const granted = this.requestLocality(loc, base);
    if (granted) await granted;
    try {
      if (this.irq) this.mmio.write32(base + REG.INT_ENABLE, (INT.globalEnable | INT.all) >>> 0);
      try {
        const w = this.writeCommand(cmd, base);
        if (w) await w;
        const duration = this.duration(cmd);
        const avail = STS.dataAvail | STS.stsValid;
        if (!this.spin(() => (this.mmio.read32(base + REG.STS) & avail) === avail)) {
          await this.waitSts(base, avail, avail, duration, 'dataAvail');
        }
        return this.readResponse(base) ?? (await this.readResponseSlow(base));
      } finally {
        // Ready again (aborts whatever is left) so the next command starts clean, and
        // acknowledge what is pending while we still own the locality (only the active
        // locality may clear INT_STATUS: a stale status would hold the line up).
        this.mmio.write8(base + REG.STS, STS.commandReady);
        if (this.irq) this.mmio.write32(base + REG.INT_STATUS, 0xffffffff);
      }
    } finally {
      this.mmio.write8(base + REG.ACCESS, ACCESS.activeLocality);
    }
  }

  /** Request the locality; a promise only when it is not granted at once (timeout A). */
  private requestLocality(loc: number, base: number): Promise<void> | undefined {
    const want = ACCESS.activeLocality | ACCESS.tpmRegValidSts;
    if ((this.mmio.read8(base + REG.ACCESS) & want) === want) return undefined;
    this.mmio.write8(base + REG.ACCESS, ACCESS.requestUse);
    if ((this.mmio.read8(base + REG.ACCESS) & want) === want) return undefined;
    return this.waitUntil(() => (this.mmio.read8(base + REG.ACCESS) & want) === want, TIMEOUT.A, base).then((ok) => {
      if (ok) return;
      this.mmio.write8(base + REG.ACCESS, ACCESS.activeLocality); // withdraw the request
      throw new VtpmError('ETIMEDOUT', `locality ${loc} not granted within ${TIMEOUT.A} ms`);
    });
  }

  /** Write the command; returns a promise only when it had to wait (commandReady, burst). */
  private writeCommand(cmd: Uint8Array, base: number): Promise<void> | undefined {
    const sts = base + REG.STS;
    if (!(this.mmio.read32(sts) & STS.commandReady)) {
      this.mmio.write8(sts, STS.commandReady);
      if (!(this.mmio.read32(sts) & STS.commandReady)) {
        return this.waitSts(base, STS.commandReady, STS.commandReady, TIMEOUT.B, 'commandReady').then(() => this.writeFrom(cmd, base, 0));
      }
    }
    return this.writeFrom(cmd, base, 0);
  }

  private writeFrom(cmd: Uint8Array, base: number, from: number): Promise<void> | undefined {
    const fifo = base + REG.DATA_FIFO;
    let off = from;
    const last = cmd.length - 1;
    while (off < last) {
      const burst = this.burst(base);
      if (burst === 0) return this.burstCount(base).then(() => this.writeFrom(cmd, base, off));
      const n = Math.min(burst, last - off);
      this.mmio.writeBytes(fifo, cmd.subarray(off, off + n));
      off += n;
      if (!(this.stsValid(base) & STS.expect)) throw new VtpmError('EIO', `TPM stopped expecting data after ${off} of ${cmd.length} bytes`);
    }
    this.mmio.write8(fifo, cmd[last]!);
    if (this.stsValid(base) & STS.expect) throw new VtpmError('EIO', `TPM still expects data after all ${cmd.length} bytes`);
    this.mmio.write8(base + REG.STS, STS.tpmGo);
    return undefined;
  }

  /** The common case without a single await: everything was there to read. */
  private readResponse(base: number): Uint8Array | undefined {
    const avail = STS.dataAvail | STS.stsValid;
    const s = this.mmio.read32(base + REG.STS);
    if ((s & avail) !== avail || ((s >>> STS.burstShift) & STS.burstMask) < TPM_HEADER_SIZE) return undefined;
    const h = this.header;
    this.mmio.readBytes(base + REG.DATA_FIFO, h);
    const size = this.responseSize(h);
    const resp = new Uint8Array(size);
    resp.set(h);
    let off = TPM_HEADER_SIZE;
    while (off < size) {
      const st = this.mmio.read32(base + REG.STS);
      const burst = (st >>> STS.burstShift) & STS.burstMask;
      if ((st & avail) !== avail || burst === 0) throw new VtpmError('EIO', `response ended after ${off} of ${size} bytes`);
      const n = Math.min(burst, size - off);
      this.mmio.readBytes(base + REG.DATA_FIFO, resp.subarray(off, off + n));
      off += n;
    }
    if (this.stsValid(base) & STS.dataAvail) throw new VtpmError('EIO', `TPM has data left after a ${size}-byte response`);
    return resp;
  }

  /** The header's fields: the response size (bounded by the FIFO) or the command's duration. */
  private responseSize(h: Uint8Array): number {
    return parseHeader(h, 'response', { whole: false, max: TIS_BUFFER_SIZE }).size;
  }
  private duration(cmd: Uint8Array): number {
    const h = parseHeader(cmd, 'command', { whole: false });
    return this.opts.durationMs ? this.opts.durationMs(h.code) : commandDurationMs(h.tag, h.code);
  }

  /** The Linux way, waiting per chunk (timeout C): for chips that hand data out slowly. */
  private async readResponseSlow(base: number): Promise<Uint8Array> {
    const h = this.header;
    await this.readChunk(base, h, 0, TPM_HEADER_SIZE);
    const size = this.responseSize(h);
    const resp = new Uint8Array(size);
    resp.set(h);
    await this.readChunk(base, resp, TPM_HEADER_SIZE, size);
    if (this.stsValid(base) & STS.dataAvail) throw new VtpmError('EIO', `TPM has data left after a ${size}-byte response`);
    return resp;
  }

  /** Read [from, to) in burst-sized chunks, each after dataAvail (timeout C). */
  private async readChunk(base: number, into: Uint8Array, from: number, to: number): Promise<void> {
    let off = from;
    while (off < to) {
      await this.waitSts(base, STS.dataAvail | STS.stsValid, STS.dataAvail | STS.stsValid, TIMEOUT.C, 'dataAvail');
      const burst = await this.burstCount(base);
      const n = Math.min(burst, to - off);
      this.mmio.readBytes(base + REG.DATA_FIFO, into.subarray(off, off + n));
      off += n;
    }
  }

  private burst(base: number): number {
    return (this.mmio.read32(base + REG.STS) >>> STS.burstShift) & STS.burstMask;
  }

  /** Spin on `cond` for at most spinUs; catches fast commands without an event-loop trip. */
  private spin(cond: () => boolean): boolean {
    if (cond()) return true;
    const start = process.hrtime.bigint();
    while (process.hrtime.bigint() - start < this.spinNs) if (cond()) return true;
    return false;
  }

  /** burstCount from STS; a 0 means "wait", up to timeout D (Linux get_burstcount). */
  private async burstCount(base: number): Promise<number> {
    let burst = 0;
    const ok = await this.waitUntil(() => (burst = (this.mmio.read32(base + REG.STS) >>> STS.burstShift) & STS.burstMask) > 0, TIMEOUT.D, base);
    if (!ok) throw new VtpmError('ETIMEDOUT', `burstCount stayed 0 for ${TIMEOUT.D} ms`);
    return burst;
  }

  private stsValid(base: number): number {
    const s = this.mmio.read32(base + REG.STS);
    if (!(s & STS.stsValid)) throw new VtpmError('EIO', 'STS not valid');
    return s;
  }

  private async waitSts(base: number, mask: number, want: number, ms: number, what: string): Promise<void> {
    const ok = await this.waitUntil(() => (this.mmio.read32(base + REG.STS) & mask) === want, ms, base);
    if (!ok) throw new VtpmError('ETIMEDOUT', `TPM did not signal ${what} within ${ms} ms`);
  }

  /** Spin briefly, then wait on the interrupt (or yield between polls), until `cond` or timeout. */
  private async waitUntil(cond: () => boolean, ms: number, base: number): Promise<boolean> {
    if (this.spin(cond)) return true;
    const deadline = Date.now() + ms;
    let polls = 0;
    for (;;) {
      if (cond()) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      if (this.irq) {
        await this.irq.wait(left);
        // Acknowledge what fired (write 1 to clear), as the interrupt handler does.
        const st = this.mmio.read32(base + REG.INT_STATUS);
        if (st) this.mmio.write32(base + REG.INT_STATUS, st);
        if (st && !this.mmio.read32(base + REG.INT_STATUS)) continue;
        // The line is held by a status we cannot acknowledge (not our locality's): poll.
      }
      // No usable interrupt: yield to the event loop, backing off to 1 ms after a while.
      await new Promise<void>((r) => (polls++ < 64 ? setImmediate(r) : setTimeout(r, 1)));
    }
  }
}
