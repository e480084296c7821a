// Waiting without timers, on the one libc binding (libc.ts): futex_waitv(2) (Linux ≥ 5.16:
// one sleep on up to 128 futex words, e.g. the upcall words of many domains), pidfd_open(2)
// (a process's exit as a readable fd) and eventfd(2), plus an event-loop poll(2) over many
// fds that runs on koffi's async worker, so a process can learn that a peer died without
// waking up now and then to look.
import koffi from 'koffi';
import { EINTR, ETIMEDOUT, libc, orErrno, sysError } from './libc.ts';

const SYS_futex_waitv = 449; // same number on x86_64 and aarch64 (the generic table)
const SYS_pidfd_open = 434; // likewise
const FUTEX2_SIZE_U32 = 0x02;
const CLOCK_MONOTONIC = 1;
/** The kernel's bound on one futex_waitv call. */
export const FUTEX_WAITV_MAX = 128;
/** sizeof(struct futex_waitv): u64 val, u64 uaddr, u32 flags, u32 reserved. */
export const FUTEX_WAITV_BYTES = 24;

const waitvFn = libc.func('long syscall(long nr, void *waiters, unsigned int n, unsigned int flags, void *timeout, int clockid)');
const pidfdOpenFn = libc.func('long syscall(long nr, int pid, unsigned int flags, intptr_t a3, intptr_t a4, intptr_t a5)');
const eventfdFn = libc.func('int eventfd(unsigned int initval, int flags)');
const clockGettimeFn = libc.func('int clock_gettime(int clk, _Out_ uint8_t *ts)');
const pollFn = libc.func('int poll(void *fds, unsigned long nfds, int timeout)');

/** Fill entry `i` of a futex_waitv array: wait while the u32 at `addr` holds `val`. Shared
 *  (not FUTEX_PRIVATE): the words live in mappings other processes share. */
export function setWaitv(buf: Buffer, i: number, addr: bigint, val: number): void {
  const o = i * FUTEX_WAITV_BYTES;
  buf.writeUInt32LE(val >>> 0, o); // u64 val, little-endian: the low word, then 0
  buf.writeUInt32LE(0, o + 4);
  buf.writeBigUInt64LE(addr, o + 8);
  buf.writeUInt32LE(FUTEX2_SIZE_U32, o + 16);
  buf.writeUInt32LE(0, o + 20);
}

/** futex_waitv over the first `n` entries of `buf`. `deadline`: an absolute CLOCK_MONOTONIC
 *  timespec (absDeadline), or null for none. Returns the index of a woken word (≥ 0), or
 *  -EAGAIN (a word no longer held its value), -ETIMEDOUT, -EINTR. */
export function futexWaitv(buf: Buffer, n: number, deadline: Buffer | null): number {
  const r = Number(waitvFn(SYS_futex_waitv, buf, n, 0, deadline, CLOCK_MONOTONIC));
  if (r >= 0) return r;
  const e = koffi.errno();
  return -(e === 0 ? EINTR : e);
}

/** Set `ts` (16 bytes) to CLOCK_MONOTONIC now + `ms` (the absolute form futex_waitv takes). */
export function absDeadline(ts: Buffer, ms: number): void {
  clockGettimeFn(CLOCK_MONOTONIC, ts);
  let sec = ts.readBigInt64LE(0) + BigInt(Math.floor(ms / 1000));
  let ns = ts.readBigInt64LE(8) + BigInt(Math.round((ms % 1000) * 1e6));
  if (ns >= 1_000_000_000n) {
    sec += 1n;
    ns -= 1_000_000_000n;
  }
  ts.writeBigInt64LE(sec, 0);
  ts.writeBigInt64LE(ns, 8);
}
export { ETIMEDOUT };

/** A pidfd for `pid` (readable once the process exits), or -errno (ESRCH: already gone). */
export function pidfdOpen(pid: number): number {
  return orErrno(pidfdOpenFn(SYS_pidfd_open, pid, 0, 0, 0, 0));
}

const EFD_CLOEXEC = 0o2000000;
const EFD_NONBLOCK = 0o4000;
/** A non-blocking eventfd (counter 0). */
export function eventFd(): number {
  const fd = eventfdFn(0, EFD_CLOEXEC | EFD_NONBLOCK) as number;
  if (fd < 0) throw sysError('eventfd', koffi.errno());
  return fd;
}

/** poll(2) on the `n` pollfd entries already in `pfds` (8 bytes each), on koffi's async
 *  worker (for event-loop callers), no timeout; calls back with the result or -errno. */
export function pollAsync(pfds: Buffer, n: number, cb: (r: number) => void): void {
  (pollFn as unknown as { async: (...a: unknown[]) => void }).async(pfds, n, -1, (err: unknown, r: number) => {
    cb(err ? -EINTR : orErrno(r));
  });
}
