// The FUSE kernel protocol (include/uapi/linux/fuse.h), the part a tpm0 node needs:
// opcodes, struct sizes, and one little-endian reader/writer pair used for every struct,
// over buffers the serve loop reuses (no allocation per request).

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we speak (7.31 has every struct layout used here). */
export const FUSE_OUR_MINOR = 31;
/** Oldest kernel minor we accept: fuse_write_in/entry_out have their current size from 7.9. */
export const FUSE_MIN_MINOR = 12;

export const OP = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  ACCESS: 34,
  INTERRUPT: 36,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  BATCH_FORGET: 42,
} as const;

export const IN_HEADER = 40; // len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid u32, extlen u16, pad u16
export const OUT_HEADER = 16; // len u32, error i32, unique u64
export const ATTR_SIZE = 88;
export const ENTRY_OUT = 40 + ATTR_SIZE;
export const ATTR_OUT = 16 + ATTR_SIZE;
export const OPEN_IN = 8;
export const OPEN_OUT = 16;
export const READ_IN = 40;
export const WRITE_IN = 40;
export const WRITE_OUT = 8;
export const RELEASE_IN = 24;
export const INTERRUPT_IN = 8;
export const INIT_IN = 16; // major, minor, max_readahead, flags (flags2 etc. after, optional)
export const INIT_OUT = 64;
export const INIT_OUT_COMPAT = 24; // kernels before 7.23
export const STATFS_OUT = 80;

export const FOPEN_DIRECT_IO = 1;
export const FUSE_MIN_READ_BUFFER = 8192;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const DT_DIR = 4;
export const DT_REG = 8;

/** Little-endian reader over a reused buffer; every read is bounds-checked against `end`. */
export class LeReader {
  private readonly dv: DataView;
  pos = 0;
  end = 0;
  constructor(readonly buf: Uint8Array) {
    this.dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  reset(pos: number, end: number): this {
    this.pos = pos;
    this.end = Math.min(end, this.buf.length);
    return this;
  }
  get left(): number {
    return this.end - this.pos;
  }
  /** True when `n` more bytes are there (callers reply EINVAL otherwise). */
  has(n: number): boolean {
    return this.pos + n <= this.end;
  }
  u16(): number {
    this.need(2);
    const v = this.dv.getUint16(this.pos, true);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.dv.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  /** u64 as a number: FUSE ids and handles we hand out are small; offsets are ignored. */
  u64(): number {
    this.need(8);
    const lo = this.dv.getUint32(this.pos, true);
    const hi = this.dv.getUint32(this.pos + 4, true);
    this.pos += 8;
    return hi * 0x1_0000_0000 + lo;
  }
  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }
  private need(n: number): void {
    if (this.pos + n > this.end) throw new RangeError(`FUSE request truncated at byte ${this.pos} (+${n} > ${this.end})`);
  }
}

/** Little-endian writer into a reused buffer. */
export class LeWriter {
  private readonly dv: DataView;
  pos = 0;
  constructor(readonly buf: Uint8Array) {
    this.dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  reset(pos = 0): this {
    this.pos = pos;
    return this;
  }
  u16(v: number): this {
    this.dv.setUint16(this.pos, v, true);
    this.pos += 2;
    return this;
  }
  u32(v: number): this {
    this.dv.setUint32(this.pos, v >>> 0, true);
    this.pos += 4;
    return this;
  }
  i32(v: number): this {
    this.dv.setInt32(this.pos, v, true);
    this.pos += 4;
    return this;
  }
  u64(v: number): this {
    this.dv.setUint32(this.pos, v % 0x1_0000_0000, true);
    this.dv.setUint32(this.pos + 4, Math.floor(v / 0x1_0000_0000), true);
    this.pos += 8;
    return this;
  }
  zero(n: number): this {
    this.buf.fill(0, this.pos, this.pos + n);
    this.pos += n;
    return this;
  }
  bytes(b: Uint8Array): this {
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }
}

export interface Attr {
  ino: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** seconds since the epoch for a/m/ctime */
  time: number;
}

/** struct fuse_attr (88 bytes). */
export function writeAttr(w: LeWriter, a: Attr): void {
  w.u64(a.ino).u64(0).u64(0); // ino, size, blocks
  w.u64(a.time).u64(a.time).u64(a.time);
  w.u32(0).u32(0).u32(0); // nsec
  w.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
  w.u32(0).u32(4096).u32(0); // rdev, blksize, flags
}

/** struct fuse_dirent: ino, off (cookie of the next entry), namelen, type, name, 8-aligned. */
export function writeDirent(w: LeWriter, ino: number, nextOff: number, type: number, name: string): void {
  w.u64(ino).u64(nextOff).u32(name.length).u32(type);
  for (let i = 0; i < name.length; i++) w.buf[w.pos++] = name.charCodeAt(i);
  const pad = (8 - (name.length % 8)) % 8;
  w.zero(pad);
}

export function direntSize(name: string): number {
  return 24 + name.length + ((8 - (name.length % 8)) % 8);
}

/** The INIT reply's body after the out header, for the kernel's `minor` (ours at most
 *  FUSE_OUR_MINOR); returns its size. Only FUSE_BIG_WRITES is kept of the kernel's flags
 *  (old kernels need it for writes above one page). */
export function writeInitOut(w: LeWriter, o: { minor: number; maxReadahead: number; flags: number; maxWrite: number }): number {
  const FUSE_BIG_WRITES = 1 << 5;
  w.u32(FUSE_KERNEL_VERSION).u32(o.minor).u32(o.maxReadahead).u32(o.flags & FUSE_BIG_WRITES);
  w.u16(1).u16(1).u32(o.maxWrite); // max_background, congestion_threshold, max_write
  w.u32(1).u16(0).u16(0).u32(0).zero(INIT_OUT - 36); // time_gran, max_pages, map_alignment, flags2, unused
  return o.minor >= 23 ? INIT_OUT : INIT_OUT_COMPAT;
}

/** READDIR's entries from offset `off` that fit in `size` bytes. */
export function writeDirents(w: LeWriter, entries: readonly (readonly [ino: number, type: number, name: string])[], off: number, size: number): void {
  const start = w.pos;
  for (let i = off; i < entries.length; i++) {
    const [ino, type, name] = entries[i]!;
    if (w.pos - start + direntSize(name) > size) break;
    writeDirent(w, ino, i + 1, type, name);
  }
}
