// Waiting on many descriptors from one thread: epoll(7) and eventfd(2), through the libc
// handle of libc.ts. One thread serving many FUSE mounts waits in epoll_wait on all their
// /dev/fuse descriptors plus an eventfd that other threads signal to hand it work (a new
// mount, a removal, stop). Linux only; struct epoll_event is packed on x86_64 (12 bytes)
// and naturally aligned elsewhere (16 bytes on aarch64).
//   const ep = new Epoll(64); ep.add(fd, token); const n = ep.wait(ms); ep.token(i) ...
import { libc, O_CLOEXEC, O_NONBLOCK, orErrno, sysError, sysRead, sysWrite, ERRNO } from './libc.ts';
import koffi from 'koffi';

export const EPOLLIN = 0x1;
export const EPOLLERR = 0x8;
export const EPOLLHUP = 0x10;
const EPOLL_CTL_ADD = 1;
const EPOLL_CTL_DEL = 2;
const EV_SIZE = process.arch === 'x64' ? 12 : 16;
const EV_DATA = process.arch === 'x64' ? 4 : 8;

const fns = {
  create: libc.func('int epoll_create1(int flags)'),
  ctl: libc.func('int epoll_ctl(int epfd, int op, int fd, void *event)'),
  wait: libc.func('int epoll_wait(int epfd, void *events, int maxevents, int timeout)'),
  eventfd: libc.func('int eventfd(unsigned int initval, int flags)'),
  close: libc.func('int close(int fd)'),
};

/** An epoll instance whose entries carry a numeric token (a slot, an id: up to 2^32-1). */
export class Epoll {
  readonly fd: number;
  private readonly out: Buffer;
  private readonly one = Buffer.alloc(EV_SIZE);
  private closed = false;

  /** `maxEvents`: how many ready entries one wait returns at most (the rest stay ready). */
  constructor(readonly maxEvents = 64) {
    const fd = fns.create(O_CLOEXEC) as number;
    if (fd < 0) throw sysError('epoll_create1', koffi.errno());
    this.fd = fd;
    this.out = Buffer.alloc(EV_SIZE * maxEvents);
  }

  /** Watch `fd` for input (level-triggered), reported with `token`. */
  add(fd: number, token: number): void {
    this.one.fill(0);
    this.one.writeUInt32LE(EPOLLIN, 0);
    this.one.writeUInt32LE(token >>> 0, EV_DATA);
    if ((fns.ctl(this.fd, EPOLL_CTL_ADD, fd, this.one) as number) < 0) throw sysError(`epoll_ctl ADD fd ${fd}`, koffi.errno());
  }

  /** Stop watching `fd` (tolerates an fd no longer watched). */
  del(fd: number): void {
    const rc = orErrno(fns.ctl(this.fd, EPOLL_CTL_DEL, fd, this.one));
    if (rc < 0 && rc !== -ERRNO.ENOENT && rc !== -ERRNO.EBADF) throw sysError(`epoll_ctl DEL fd ${fd}`, -rc);
  }

  /** Wait up to `timeoutMs` (< 0 or Infinity: for ever); the number of ready entries, 0 on
   *  timeout, or -errno (EINTR). */
  wait(timeoutMs: number): number {
    const ms = timeoutMs < 0 || timeoutMs === Infinity ? -1 : Math.min(Math.ceil(timeoutMs), 0x7fffffff);
    return orErrno(fns.wait(this.fd, this.out, this.maxEvents, ms));
  }

  /** The token of ready entry `i` of the last wait. */
  token(i: number): number {
    return this.out.readUInt32LE(i * EV_SIZE + EV_DATA);
  }

  /** The events of ready entry `i` of the last wait (EPOLLIN, EPOLLERR, EPOLLHUP). */
  events(i: number): number {
    return this.out.readUInt32LE(i * EV_SIZE);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fns.close(this.fd);
  }
}

/** A non-blocking eventfd: any thread signals it, the waiting thread drains it. */
export class EventFd {
  readonly fd: number;
  private readonly buf = new Uint8Array(8);
  private readonly inc = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0]);

  constructor(fd?: number) {
    if (fd !== undefined) {
      this.fd = fd; // another thread's: signal() only
      return;
    }
    const made = fns.eventfd(0, O_CLOEXEC | O_NONBLOCK) as number;
    if (made < 0) throw sysError('eventfd', koffi.errno());
    this.fd = made;
  }

  /** Wake the thread waiting on this eventfd (its counter goes up by one). */
  signal(): void {
    const n = sysWrite(this.fd, this.inc, 8);
    if (n < 0 && n !== -ERRNO.EAGAIN) throw sysError('eventfd write', -n);
  }

  /** Reset the counter (after a wake); false when it was not signalled. */
  drain(): boolean {
    return sysRead(this.fd, this.buf, 8) === 8;
  }

  close(): void {
    fns.close(this.fd);
  }
}
