// The one big-endian reader/writer pair for TPM wire formats. Every TPM structure is
// read and written through these, so bounds are checked in one place.
import { VtpmError } from '../base/errors.ts';

export class Reader {
  private off: number;
  constructor(
    readonly buf: Uint8Array,
    offset = 0,
    private readonly end = buf.length,
  ) {
    if (end > buf.length) throw new VtpmError('ETRUNC', `reader end ${end} beyond buffer of ${buf.length}`);
    this.off = offset;
  }
  get offset(): number {
    return this.off;
  }
  get remaining(): number {
    return this.end - this.off;
  }
  private need(n: number, what: string): number {
    if (n < 0 || this.off + n > this.end) {
      throw new VtpmError('ETRUNC', `truncated: ${what} needs ${n} bytes at offset ${this.off}, ${this.end - this.off} left`);
    }
    const at = this.off;
    this.off += n;
    return at;
  }
  u8(what = 'u8'): number {
    return this.buf[this.need(1, what)]!;
  }
  u16(what = 'u16'): number {
    const o = this.need(2, what);
    return (this.buf[o]! << 8) | this.buf[o + 1]!;
  }
  u32(what = 'u32'): number {
    const o = this.need(4, what);
    return ((this.buf[o]! << 24) | (this.buf[o + 1]! << 16) | (this.buf[o + 2]! << 8) | this.buf[o + 3]!) >>> 0;
  }
  u64(what = 'u64'): bigint {
    const hi = BigInt(this.u32(what));
    return (hi << 32n) | BigInt(this.u32(what));
  }
  /** A view (no copy) of the next n bytes. */
  bytes(n: number, what = 'bytes'): Uint8Array {
    const o = this.need(n, what);
    return this.buf.subarray(o, o + n);
  }
  /** TPM2B: u16 size then bytes. */
  sized16(what = 'TPM2B', max = 0xffff): Uint8Array {
    const n = this.u16(what);
    if (n > max) throw new VtpmError('EOVERSIZE', `${what}: size ${n} exceeds ${max}`);
    return this.bytes(n, what);
  }
  /** u32 size then bytes (TPM 1.2 style). */
  sized32(what = 'sized32', max = 1 << 20): Uint8Array {
    const n = this.u32(what);
    if (n > max) throw new VtpmError('EOVERSIZE', `${what}: size ${n} exceeds ${max}`);
    return this.bytes(n, what);
  }
  skip(n: number, what = 'skip'): void {
    this.need(n, what);
  }
  /** A sub-reader over the next n bytes, advancing this one past them. */
  sub(n: number, what = 'sub'): Reader {
    const o = this.need(n, what);
    return new Reader(this.buf, o, o + n);
  }
  expectEnd(what = 'structure'): void {
    if (this.off !== this.end) throw new VtpmError('EINVAL', `${what}: ${this.end - this.off} trailing bytes`);
  }
}

export class Writer {
  private buf: Uint8Array;
  private off = 0;
  constructor(initial = 256) {
    this.buf = new Uint8Array(initial);
  }
  get length(): number {
    return this.off;
  }
  private room(n: number): number {
    if (this.off + n > this.buf.length) {
      const next = new Uint8Array(Math.max(this.buf.length * 2, this.off + n));
      next.set(this.buf.subarray(0, this.off));
      this.buf = next;
    }
    const at = this.off;
    this.off += n;
    return at;
  }
  u8(v: number): this {
    const o = this.room(1); // room() may replace this.buf: call it first
    this.buf[o] = v & 0xff;
    return this;
  }
  u16(v: number): this {
    const o = this.room(2);
    this.buf[o] = (v >>> 8) & 0xff;
    this.buf[o + 1] = v & 0xff;
    return this;
  }
  u32(v: number): this {
    const o = this.room(4);
    this.buf[o] = (v >>> 24) & 0xff;
    this.buf[o + 1] = (v >>> 16) & 0xff;
    this.buf[o + 2] = (v >>> 8) & 0xff;
    this.buf[o + 3] = v & 0xff;
    return this;
  }
  u64(v: bigint): this {
    return this.u32(Number((v >> 32n) & 0xffffffffn)).u32(Number(v & 0xffffffffn));
  }
  bytes(b: Uint8Array): this {
    const o = this.room(b.length);
    this.buf.set(b, o);
    return this;
  }
  sized16(b: Uint8Array): this {
    if (b.length > 0xffff) throw new VtpmError('EOVERSIZE', `TPM2B of ${b.length} bytes`);
    return this.u16(b.length).bytes(b);
  }
  sized32(b: Uint8Array): this {
    return this.u32(b.length).bytes(b);
  }
  /** Reserve a u32 to patch later (command size fields). */
  mark32(): number {
    return this.room(4);
  }
  mark16(): number {
    return this.room(2);
  }
  patch32(at: number, v: number): void {
    new DataView(this.buf.buffer, this.buf.byteOffset).setUint32(at, v >>> 0);
  }
  patch16(at: number, v: number): void {
    new DataView(this.buf.buffer, this.buf.byteOffset).setUint16(at, v);
  }
  /** Bytes written so far (a copy, safe to keep). */
  finish(): Uint8Array {
    return this.buf.slice(0, this.off);
  }
}
