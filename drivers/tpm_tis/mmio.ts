// The bus side of the TIS model: memory-mapped register access and the interrupt line
// (the chip behind the register file is the other seam: chip.ts).

/** Memory-mapped access to the TIS window: `addr` is the offset from the TIS base
 *  (locality n at n * 0x1000). Registers are little-endian, as on x86. */
export interface Mmio {
  read8(addr: number): number;
  read16(addr: number): number;
  read32(addr: number): number;
  write8(addr: number, value: number): void;
  write16(addr: number, value: number): void;
  write32(addr: number, value: number): void;
  /** Bulk FIFO transfers (Linux's phy_ops read_bytes/write_bytes): the same rules as
   *  that many single-byte accesses, without a call per byte. */
  readBytes(addr: number, into: Uint8Array): void;
  writeBytes(addr: number, from: Uint8Array): void;
}

/** The interrupt line: resolves true once asserted, false when the timeout passed first. */
export interface IrqLine {
  wait(timeoutMs: number): Promise<boolean>;
}

/** Pending interrupt-line waiters, each with its own timeout. */
export class Waiters {
  private list: Array<(v: boolean) => void> = [];
  get waiting(): boolean {
    return this.list.length > 0;
  }
  wake(v: boolean): void {
    for (const w of this.list.splice(0)) w(v);
  }
  wait(timeoutMs: number): Promise<boolean> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        const i = this.list.indexOf(done);
        if (i >= 0) this.list.splice(i, 1);
        resolve(false);
      }, timeoutMs);
      const done = (v: boolean) => {
        clearTimeout(timer);
        resolve(v);
      };
      this.list.push(done);
    });
  }
}
