// The raw FUSE server of one mount, on any message-preserving fd (the /dev/fuse descriptor
// of a mount, or one end of a SOCK_SEQPACKET pair in tests). run() is the loop of a thread
// that serves this one mount (blocking read(2)); a thread serving many mounts
// (fuse-multi.ts) waits in epoll on all their fds and calls step() on the ready ones, each
// mount keeping its own state here (tpm-dev core, parked OPENs, tpmrm0 spaces, the command
// in flight) and the thread's buffers shared by all (ServeBuffers: one request at a time).
//
// Waiting, and why one thread: the only request that must wait without blocking the loop is
// OPEN while the node is taken (the kernel may still be delivering the previous opener's
// RELEASE). FUSE lets us answer out of order, so such an OPEN is parked with a deadline and
// the loop poll(2)s the fd with the time left: a RELEASE arriving satisfies it, an INTERRUPT
// for it answers EINTR, the deadline answers EBUSY (expireParked). Polling happens only while
// an OPEN is parked; otherwise run() blocks in read(2) (one syscall per request, the C floor).
// A WRITE hands the command to the backend (tpm0-commands.ts); with a split backend (vtpmd
// over tpmif) it is answered first and the following READ waits for the response (Linux's
// async tpm-dev mode: one fewer sleep per command, and the vTPM works while the client
// turns round), otherwise the WRITE waits. While the thread waits nothing else can be
// served, which tpm-dev allows (one opener, one command at a time); on a thread shared by
// many mounts, the other mounts wait too: guests sharing a thread serialize like commands
// on one chip. A RELEASE cannot arrive for that file meanwhile (the caller's syscall holds
// it); an INTERRUPT for it is read afterwards and ignored (the request was answered); the
// backend's own timeout bounds the wait, and a failure answers EIO. A file released with
// its command still running: the response is collected and dropped before the next
// command goes out. A second reader thread per mount was rejected: it would need locking
// around the core and the backend for no gain under tpm-dev's one-command rule.
//
// tpmrm0 (TPM 2.0 backends, when a ResourceManager is given): any number of openers, each
// file a space of drivers/tpmrm. Its commands run whole in the WRITE (the resource manager's
// loads, the command, its saves and flushes: Linux' blocking mode), on this same thread, so
// they serialize with tpm0's as Linux serializes both on the chip's mutex; tpm0's one-opener
// rule does not concern tpmrm0 openers (tpm-dev.c's is_open bit is tpm0's alone). A tpm0
// command still in flight with a split backend is collected first and kept for its file
// (the core copies every response: the next command reuses the transport's buffer).

import { VtpmError } from '../base/errors.ts';
import type { SyncTransport } from '../tpm/transport.ts';
import { Tpm0Commands } from './tpm0-commands.ts';
import * as P from './fuse-proto.ts';
import { LeReader, LeWriter } from './fuse-proto.ts';
import { ERRNO, sysPollIn, sysRead, sysWrite } from '../base/libc.ts';
import { TpmDevCore } from './tpmdev.ts';
import type { ResourceManager } from '../tpmrm/resource-manager.ts';
import { RmFiles } from './rm-files.ts';
import { ParkedOpens, type ParkedOpen } from './parked-opens.ts';

export const ROOT_ID = 1;
export const TPM0_ID = 2;
export const TPMRM0_ID = 3;
export const NODE_NAME = 'tpm0';
export const RM_NODE_NAME = 'tpmrm0';
export const DEFAULT_MAX_WRITE = 8192; // > 4096 so a too-big command arrives whole and gets E2BIG
const ATTR_VALID_S = 1;
/** The node dir's entries, without and with tpmrm0 (made once, not per READDIR). */
const ENTRIES = [
  [ROOT_ID, P.DT_DIR, '.'],
  [ROOT_ID, P.DT_DIR, '..'],
  [TPM0_ID, P.DT_REG, NODE_NAME],
] as const;
const ENTRIES_RM = [...ENTRIES, [TPMRM0_ID, P.DT_REG, RM_NODE_NAME]] as const;

/** A serving thread's request and reply buffers, shared by the mounts it serves (it handles
 *  one request at a time; parked OPENs keep a copy of their unique). */
export class ServeBuffers {
  readonly inBuf: Uint8Array;
  readonly outBuf: Uint8Array;
  readonly r: LeReader;
  readonly w: LeWriter;
  readonly pfd = Buffer.alloc(8);
  /** The largest WRITE a mount served with these buffers may negotiate. */
  constructor(readonly maxWrite = DEFAULT_MAX_WRITE) {
    this.inBuf = new Uint8Array(Math.max(P.FUSE_MIN_READ_BUFFER, P.IN_HEADER + P.WRITE_IN + maxWrite) + 4096);
    this.outBuf = new Uint8Array(P.OUT_HEADER + 8192);
    this.r = new LeReader(this.inBuf);
    this.w = new LeWriter(this.outBuf);
  }
}

export interface ServeOptions {
  fd: number;
  /** The thread's buffers when it serves several mounts (default: this mount's own). */
  buffers?: ServeBuffers;
  backend: SyncTransport;
  core: TpmDevCore;
  /** Serve tpmrm0 beside tpm0 through this resource manager (over the same backend). */
  rm?: ResourceManager | null;
  /** Owner of the node (the mount's user_id/group_id). */
  uid?: number;
  gid?: number;
  maxWrite?: number;
  locality?: number;
  /** Shared stop flag: the loop returns after the request that follows a store of 1. */
  stop?: Int32Array;
  /** Called once INIT has been answered. */
  onInit?: (minor: number) => void;
  /** A backend failure the client sees as EIO: the cause, to be reported (once) by the caller. */
  onBackendError?: (e: unknown) => void;
}

export type ServeEnd = 'destroyed' | 'unmounted' | 'closed' | 'stopped';

export class FuseServer {
  private readonly fd: number;
  private readonly core: TpmDevCore;
  /** tpm0's commands through the backend (tpm0-commands.ts). */
  private readonly tpm0: Tpm0Commands;
  private readonly maxWrite: number;
  private readonly inBuf: Uint8Array;
  private readonly outBuf: Uint8Array;
  private readonly r: LeReader;
  private readonly w: LeWriter;
  private readonly pfd: Buffer;
  private readonly parked = new ParkedOpens();
  private readonly time = Math.floor(Date.now() / 1000);
  private initDone = false;
  /** Bound once, not per command: the resource manager calls `collect` before it uses the
   *  backend; tpm0's WRITE is answered through `answerWrite`. */
  private readonly collect = () => this.tpm0.collect();
  private readonly answerWrite = () => this.replyWritten();
  /** The WRITE being decoded (writeRequest). */
  private wFh = 0;
  private wSize = 0;
  private ended: ServeEnd | null = null;
  /** tpmrm0: its files (many openers), each with its space. */
  private readonly rm: RmFiles | null;
  /** Requests dropped for being unanswerable (shorter than a header): visible to tests. */
  dropped = 0;
  /** Why the loop ended early, if a reply could not be written. */
  writeError: VtpmError | null = null;

  constructor(private readonly o: ServeOptions) {
    this.fd = o.fd;
    this.core = o.core;
    this.tpm0 = new Tpm0Commands(o.core, o.backend, o.locality ?? 0, o.onBackendError);
    this.rm = o.rm ? new RmFiles(o.rm, o.core.responseTimeoutMs, o.onBackendError) : null;
    this.maxWrite = o.maxWrite ?? DEFAULT_MAX_WRITE;
    const b = o.buffers ?? new ServeBuffers(this.maxWrite);
    if (b.maxWrite < this.maxWrite) throw new VtpmError('EINVAL', `buffers for writes of ${b.maxWrite} bytes cannot serve max_write ${this.maxWrite}`);
    this.inBuf = b.inBuf;
    this.outBuf = b.outBuf;
    this.r = b.r;
    this.w = b.w;
    this.pfd = b.pfd;
  }

  /** Serve until unmount, DESTROY, the peer closing, or the stop flag (this thread serves
   *  this mount alone: it blocks in read(2)). */
  run(): ServeEnd {
    while (this.ended === null) {
      if (this.o.stop && Atomics.load(this.o.stop, 0) !== 0) return 'stopped';
      if (this.parked.length > 0 && !this.waitParked()) continue;
      const end = this.step();
      if (end) return end;
    }
    return this.ended;
  }

  /** Read one request and answer it (on a non-blocking fd, nothing to read is no error).
   *  Null while the mount serves, else how it ended. */
  step(): ServeEnd | null {
    if (this.ended) return this.ended;
    const n = sysRead(this.fd, this.inBuf, this.inBuf.length);
    if (n < 0) {
      if (n === -ERRNO.EINTR || n === -ERRNO.EAGAIN || n === -ERRNO.ENOENT) return null; // ENOENT: request aborted before we read it
      if (n === -ERRNO.ENODEV) return (this.ended = 'unmounted');
      throw new VtpmError('EIO', `read from FUSE fd failed: errno ${-n}`);
    }
    if (n === 0) return (this.ended = 'closed');
    this.handle(n);
    return this.ended;
  }

  /** OPENs of tpm0 waiting for the node to be free. */
  get parkedOpens(): number {
    return this.parked.length;
  }

  /** Answer EBUSY to the parked OPENs whose grace has passed; ms until the next deadline
   *  (Infinity when none is parked): how long the serving thread may wait for input. */
  expireParked(): number {
    while (this.parked.length > 0) {
      const left = this.parked.leftMs();
      if (left > 0) return left;
      this.replyParked(this.parked.shift()!, ERRNO.EBUSY);
    }
    return Infinity;
  }

  /** Poll with the earliest parked OPEN's deadline; false when the loop should re-check. */
  private waitParked(): boolean {
    const left = this.expireParked();
    if (left === Infinity) return false;
    const rev = sysPollIn(this.fd, left, this.pfd);
    return rev !== 0 && rev !== -ERRNO.EINTR;
  }

  private handle(n: number): void {
    if (n < P.IN_HEADER) {
      this.dropped++; // no complete header: no unique to answer to
      return;
    }
    const r = this.r.reset(0, n);
    const len = r.u32();
    const opcode = r.u32();
    r.skip(8); // unique (copied raw into the reply)
    const nodeid = r.u64();
    r.skip(16); // uid, gid, pid, total_extlen, padding
    if (len !== n) return this.reply(ERRNO.EINVAL);
    if (opcode === P.OP.FORGET || opcode === P.OP.BATCH_FORGET) return; // never answered
    if (!this.initDone && opcode !== P.OP.INIT) return this.reply(ERRNO.EIO);
    try {
      this.dispatch(opcode, nodeid);
    } catch (e) {
      // A truncated body (RangeError from the reader) or anything unexpected: answer, never crash.
      this.reply(e instanceof RangeError ? ERRNO.EINVAL : ERRNO.EIO);
    }
  }

  private dispatch(op: number, nodeid: number): void {
    const r = this.r;
    switch (op) {
      case P.OP.INIT:
        return this.init();
      case P.OP.LOOKUP: {
        const nul = this.inBuf.indexOf(0, r.pos);
        const end = nul < 0 || nul >= r.end ? r.end : nul;
        const name = nodeid === ROOT_ID && end - r.pos <= RM_NODE_NAME.length ? Buffer.from(this.inBuf.buffer, this.inBuf.byteOffset + r.pos, end - r.pos).toString('latin1') : '';
        const id = name === NODE_NAME ? TPM0_ID : name === RM_NODE_NAME && this.rm ? TPMRM0_ID : 0;
        if (id === 0) return this.reply(ERRNO.ENOENT);
        const w = this.w.reset(P.OUT_HEADER);
        w.u64(id).u64(0).u64(ATTR_VALID_S).u64(ATTR_VALID_S).u32(0).u32(0);
        this.attr(id);
        return this.replyOk(w.pos - P.OUT_HEADER);
      }
      case P.OP.GETATTR:
      case P.OP.SETATTR: {
        if (nodeid !== ROOT_ID && nodeid !== TPM0_ID && !(nodeid === TPMRM0_ID && this.rm)) return this.reply(ERRNO.ENOENT);
        if (op === P.OP.SETATTR && nodeid === ROOT_ID) return this.reply(ERRNO.EPERM);
        // SETATTR on tpm0 (O_TRUNC, touch) changes nothing: answer the unchanged attributes.
        const w = this.w.reset(P.OUT_HEADER).u64(ATTR_VALID_S).u32(0).u32(0);
        this.attr(nodeid);
        return this.replyOk(w.pos - P.OUT_HEADER);
      }
      case P.OP.OPEN:
        if (nodeid === ROOT_ID) return this.reply(ERRNO.EISDIR);
        r.u32(); // flags: O_TRUNC/O_APPEND mean nothing for a device
        if (nodeid === TPMRM0_ID && this.rm) return this.openSpace();
        if (nodeid !== TPM0_ID) return this.reply(ERRNO.ENOENT);
        return this.open();
      case P.OP.OPENDIR:
        if (nodeid !== ROOT_ID) return this.reply(ERRNO.ENOTDIR);
        this.w.reset(P.OUT_HEADER).u64(0).u32(0).u32(0);
        return this.replyOk(P.OPEN_OUT);
      case P.OP.READDIR:
        return this.readdir(nodeid);
      case P.OP.RELEASEDIR:
      case P.OP.FLUSH:
      case P.OP.FSYNC:
        return this.reply(0);
      case P.OP.READ: {
        const fh = r.u64();
        r.u64(); // offset: ignored, a device has none
        const size = r.u32();
        if (nodeid === TPMRM0_ID && this.rm) return this.readFrom(this.rm.core, fh, size);
        const errno = this.tpm0.beforeRead(fh);
        if (errno !== 0) return this.reply(errno);
        return this.readFrom(this.core, fh, size);
      }
      case P.OP.WRITE:
        return nodeid === TPMRM0_ID && this.rm ? this.writeSpace() : this.write();
      case P.OP.RELEASE: {
        const fh = r.u64();
        if (nodeid === TPMRM0_ID && this.rm) return this.releaseSpace(fh);
        this.tpm0.released(fh);
        this.core.release(fh);
        this.reply(0);
        return this.unpark();
      }
      case P.OP.STATFS: {
        const w = this.w.reset(P.OUT_HEADER).zero(40); // blocks, bfree, bavail, files, ffree
        w.u32(4096).u32(255).u32(4096).u32(0).zero(24); // bsize, namelen, frsize, padding, spare
        return this.replyOk(P.STATFS_OUT);
      }
      case P.OP.INTERRUPT: {
        // Only a parked OPEN can still be interrupted; anything else was already answered.
        const at = r.pos;
        r.u64();
        const p = this.parked.take(this.inBuf, at);
        if (p) this.replyParked(p, ERRNO.EINTR);
        return; // INTERRUPT itself is never answered
      }
      case P.OP.DESTROY:
        this.reply(0);
        this.ended = 'destroyed';
        return;
      case P.OP.IOCTL:
        return this.reply(ERRNO.ENOTTY); // tpm0 has no ioctl; tcsd falls back to read/write
      case P.OP.GETXATTR:
        return this.reply(ERRNO.ENODATA);
      default:
        // POLL included: ENOSYS makes the kernel report the file always readable without a
        // round trip per poll, which is right because a read waits for the response in flight.
        return this.reply(ERRNO.ENOSYS);
    }
  }

  private readFrom(core: TpmDevCore, fh: number, size: number): void {
    const got = core.read(fh, Math.min(size, this.outBuf.length - P.OUT_HEADER));
    if (typeof got === 'number') return this.reply(-got);
    this.outBuf.set(got, P.OUT_HEADER);
    return this.replyOk(got.length);
  }

  private openSpace(): void {
    this.replyOpen(null, this.rm!.open());
  }

  /** A tpmrm0 command, whole: the resource manager's refusals are the write's errno. */
  private writeSpace(): void {
    if (!this.writeRequest()) return this.reply(ERRNO.EINVAL);
    const size = this.wSize;
    const res = this.rm!.write(this.wFh, this.inBuf.subarray(this.r.pos, this.r.pos + size), this.o.locality ?? 0, this.collect);
    if (res < 0) return this.reply(-res);
    this.w.reset(P.OUT_HEADER).u32(size).u32(0);
    this.replyOk(P.WRITE_OUT);
  }

  /** Closing a tpmrm0 file flushes its space before the RELEASE is answered. */
  private releaseSpace(fh: number): void {
    this.rm!.release(fh, this.collect);
    this.reply(0);
  }

  private init(): void {
    const r = this.r;
    const major = r.u32();
    const minor = r.u32();
    const maxReadahead = r.u32();
    const flags = r.u32();
    if (major !== P.FUSE_KERNEL_VERSION || minor < P.FUSE_MIN_MINOR) return this.reply(ERRNO.EPROTO);
    const ours = Math.min(minor, P.FUSE_OUR_MINOR);
    this.replyOk(P.writeInitOut(this.w.reset(P.OUT_HEADER), { minor: ours, maxReadahead, flags, maxWrite: this.maxWrite }));
    this.initDone = true;
    this.o.onInit?.(ours);
  }

  private open(): void {
    const h = this.core.open();
    if (h > 0) return this.replyOpen(null, h);
    // Busy: park until the previous opener's RELEASE arrives or the grace ends.
    this.parked.park(this.inBuf.subarray(8, 16), this.core.graceMs);
  }

  private unpark(): void {
    while (this.parked.length > 0) {
      const h = this.core.open();
      if (h <= 0) return;
      this.replyOpen(this.parked.shift()!.unique, h);
    }
  }

  private replyOpen(unique: Uint8Array | null, fh: number): void {
    this.w.reset(P.OUT_HEADER).u64(fh).u32(P.FOPEN_DIRECT_IO).u32(0);
    this.send(unique, 0, P.OPEN_OUT);
  }

  private replyParked(p: ParkedOpen, errno: number): void {
    this.send(p.unique, errno, 0);
  }

  /** Decode a WRITE request into wFh / wSize (its bytes start at the reader's position);
   *  false when the size is out of bounds. Fields, not an object: nothing allocated per command. */
  private writeRequest(): boolean {
    const r = this.r;
    this.wFh = r.u64();
    r.u64(); // offset: ignored
    this.wSize = r.u32();
    r.skip(P.WRITE_IN - 20);
    return this.wSize <= this.maxWrite && this.wSize <= r.left;
  }

  private write(): void {
    if (!this.writeRequest()) return this.reply(ERRNO.EINVAL);
    const errno = this.tpm0.write(this.wFh, this.inBuf.subarray(this.r.pos, this.r.pos + this.wSize), this.answerWrite);
    if (errno !== 0) this.reply(errno);
  }

  private replyWritten(): void {
    this.w.reset(P.OUT_HEADER).u32(this.wSize).u32(0);
    this.replyOk(P.WRITE_OUT);
  }

  private readdir(nodeid: number): void {
    if (nodeid !== ROOT_ID) return this.reply(ERRNO.ENOTDIR);
    const r = this.r;
    r.u64(); // fh
    const off = r.u64();
    const size = Math.min(r.u32(), this.outBuf.length - P.OUT_HEADER);
    const w = this.w.reset(P.OUT_HEADER);
    P.writeDirents(w, this.rm ? ENTRIES_RM : ENTRIES, off, size);
    this.replyOk(w.pos - P.OUT_HEADER);
  }

  private attr(nodeid: number): void {
    const dir = nodeid === ROOT_ID;
    P.writeAttr(this.w, {
      ino: nodeid,
      mode: dir ? P.S_IFDIR | 0o700 : P.S_IFREG | 0o600,
      nlink: dir ? 2 : 1,
      uid: this.o.uid ?? 0,
      gid: this.o.gid ?? 0,
      time: this.time,
    });
  }

  /** Answer the current request with an error (0 = success without payload). */
  private reply(errno: number): void {
    this.send(null, errno, 0);
  }

  private replyOk(payload: number): void {
    this.send(null, 0, payload);
  }

  /** `unique`: a parked request's, or null for the current request's (copied as is). */
  private send(unique: Uint8Array | null, errno: number, payload: number): void {
    const len = P.OUT_HEADER + payload;
    const w = this.w.reset(0).u32(len).i32(-errno);
    const out = this.outBuf;
    if (unique) out.set(unique, w.pos);
    else for (let i = 0; i < 8; i++) out[w.pos + i] = this.inBuf[8 + i]!; // no view per reply
    const n = sysWrite(this.fd, this.outBuf, len);
    // ENOENT: the request was interrupted/aborted meanwhile; the kernel no longer waits.
    if (n === -ERRNO.ENODEV) this.ended = 'unmounted';
    else if (n < 0 && n !== -ERRNO.ENOENT && n !== -ERRNO.EINTR) {
      // The fd is unusable (peer gone or worse): end the loop rather than throw mid-request.
      this.ended = 'closed';
      this.writeError = new VtpmError('EIO', `FUSE reply write failed: errno ${-n}`);
    }
  }
}
