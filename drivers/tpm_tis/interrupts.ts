// The TIS interrupt registers of the five localities (INT_ENABLE, INT_STATUS, INT_VECTOR)
// and the line they drive: asserted while some locality has an enabled cause pending with
// globalEnable set. The register file raises causes; a driver waits on the line.
import { INT, LOCALITIES, REG } from './regs.ts';
import { Waiters } from './mmio.ts';

export class TisInterrupts {
  private readonly enable = new Uint32Array(LOCALITIES);
  private readonly status = new Uint32Array(LOCALITIES);
  private readonly vector = new Uint8Array(LOCALITIES);
  private readonly line = new Waiters();

  /** Register read; undefined when `base` is not an interrupt register. */
  read(loc: number, base: number): number | undefined {
    switch (base) {
      case REG.INT_ENABLE:
        return this.enable[loc]!;
      case REG.INT_VECTOR:
        return this.vector[loc]!;
      case REG.INT_STATUS:
        return this.status[loc]!;
      default:
        return undefined;
    }
  }

  /** Register write (bytes selected by `mask`); false when `base` is not ours. */
  write(loc: number, base: number, v: number, mask: number): boolean {
    switch (base) {
      case REG.INT_ENABLE: {
        const writable = (INT.globalEnable | INT.all | 0x18) & mask;
        this.enable[loc] = ((this.enable[loc]! & ~writable) | (v & writable)) >>> 0;
        this.signal();
        return true;
      }
      case REG.INT_VECTOR:
        if (mask & 0xff) this.vector[loc] = v & 0x0f;
        return true;
      case REG.INT_STATUS:
        this.status[loc] = (this.status[loc]! & ~(v & mask)) >>> 0; // write 1 to clear
        return true;
      default:
        return false;
    }
  }

  raise(loc: number, bits: number): void {
    this.status[loc] = (this.status[loc]! | bits) >>> 0;
    this.signal();
  }

  asserted(): boolean {
    for (let l = 0; l < LOCALITIES; l++) {
      const en = this.enable[l]!;
      if (en & INT.globalEnable && this.status[l]! & en & INT.all) return true;
    }
    return false;
  }

  /** Wait for the line (true) or the timeout (false). */
  wait(timeoutMs: number): Promise<boolean> {
    if (this.asserted()) return Promise.resolve(true);
    return this.line.wait(timeoutMs);
  }

  /** Release every waiter with "no interrupt" (the device is going away). */
  drop(): void {
    this.line.wake(false);
  }

  private signal(): void {
    if (this.line.waiting && this.asserted()) this.line.wake(true);
  }
}
