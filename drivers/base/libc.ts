// Minimal libc bindings through koffi for the emulated Xen primitives: mmap/munmap of a
// shared file, and futex(2) on a word of such a mapping (FUTEX_WAIT / FUTEX_WAKE without
// FUTEX_PRIVATE_FLAG, so the key is the file page and two processes, or two mappings in one
// process, meet on the same word).
//
// Works in the main thread and in worker_threads alike (koffi loads once per isolate).
// Linux only (x86_64 and aarch64 syscall numbers below).

import koffi from 'koffi';
import fs from 'node:fs';
import { VtpmError } from './errors.ts';

const SYS_futex = process.arch === 'arm64' ? 98 : 202;
export const FUTEX_WAIT = 0;
export const FUTEX_WAKE = 1;
const PROT_READ = 1;
const PROT_WRITE = 2;
const MAP_SHARED = 1;
const MAP_PRIVATE = 2;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
export const EAGAIN = 11;
export const EINTR = 4;
export const ETIMEDOUT = 110;

const libc = koffi.load('libc.so.6');
const mmapFn = libc.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)');
const munmapFn = libc.func('int munmap(void *addr, size_t len)');
const mmapFixedFn = libc.func('void *mmap(intptr_t addr, size_t len, int prot, int flags, int fd, int64_t off)');
const munmapAddrFn = libc.func('int munmap(intptr_t addr, size_t len)');

// unmap() must never leave a JavaScript view pointing at unmapped memory (a later access
// would be a SIGSEGV, not an exception): it replaces the shared mapping with private
// zero pages at the same address (dropping the file reference at once), and the address
// range itself is returned to the kernel when the ArrayBuffer is garbage collected.
const reaper = new FinalizationRegistry<{ addr: bigint; length: number }>((r) => {
  munmapAddrFn(r.addr, r.length);
});
// syscall(2) is variadic; glibc implements it in assembly that only moves registers, so a
// fixed prototype with integer arguments is exact on x86_64 and aarch64 and avoids koffi's
// slower variadic path. uaddr is passed as an integer address; timeout as a pointer.
const futexWaitFn = libc.func('long syscall(long nr, intptr_t uaddr, int op, int val, void *ts, intptr_t uaddr2, int val3)');
const futexWakeFn = libc.func('long syscall(long nr, intptr_t uaddr, int op, int val, intptr_t ts, intptr_t uaddr2, int val3)');

export interface Mapping {
  /** ArrayBuffer over the mapped bytes (not a copy). */
  readonly buffer: ArrayBuffer;
  /** Address of byte 0 of the mapping (for futex). */
  readonly addr: bigint;
  readonly length: number;
  readonly writable: boolean;
  unmap(): void;
}

/** Map `length` bytes of `path` at byte offset `offset` (page-aligned), shared. */
export function mapFile(path: string, offset: number, length: number, writable: boolean): Mapping {
  let fd: number;
  try {
    fd = fs.openSync(path, writable ? 'r+' : 'r');
  } catch (e) {
    throw new VtpmError((e as NodeJS.ErrnoException).code === 'ENOENT' ? 'ENOENT' : 'EIO', `open ${path}: ${(e as Error).message}`, { cause: e });
  }
  try {
    const prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    const ptr = mmapFn(null, length, prot, MAP_SHARED, fd, offset);
    const addr = koffi.address(ptr);
    if (addr === 0xffffffffffffffffn || addr === -1n) throw new VtpmError('EIO', `mmap ${path} failed (errno ${koffi.errno()})`);
    const buffer = koffi.view(ptr, length);
    let mapped = true;
    const token = { addr, length };
    reaper.register(buffer, token);
    return {
      buffer,
      addr,
      length,
      writable,
      unmap() {
        if (!mapped) return;
        mapped = false;
        const r = mmapFixedFn(addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS, -1, 0);
        if (koffi.address(r) !== addr) munmapFn(ptr, length); // cannot happen with MAP_FIXED; last resort
      },
    };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * FUTEX_WAIT on the 32-bit word at `addr` while it holds `expected`.
 * Returns 0 when woken, EAGAIN when the value differed, ETIMEDOUT, or EINTR.
 * `ts` is a 16-byte buffer from `timespec()`, or null for no timeout.
 */
export function futexWait(addr: bigint, expected: number, ts: Buffer | null): number {
  const r = futexWaitFn(SYS_futex, addr, FUTEX_WAIT, expected | 0, ts, 0, 0);
  if (Number(r) === 0) return 0;
  return koffi.errno();
}

/** Event-loop-friendly FUTEX_WAIT: runs on koffi's async worker, calls back with the result code. */
export function futexWaitAsync(addr: bigint, expected: number, ts: Buffer, cb: (code: number) => void): void {
  futexWaitFn.async(SYS_futex, addr, FUTEX_WAIT, expected | 0, ts, 0, 0, (err: unknown, r: number | bigint) => {
    if (err) cb(EINTR);
    else cb(Number(r) === 0 ? 0 : koffi.errno() || ETIMEDOUT);
  });
}

/** FUTEX_WAKE up to `count` waiters on the word at `addr`; returns how many were woken. */
export function futexWake(addr: bigint, count = 1): number {
  return Number(futexWakeFn(SYS_futex, addr, FUTEX_WAKE, count, 0, 0, 0));
}

/** A struct timespec (relative timeout) for futexWait. */
export function timespec(ms: number): Buffer {
  const b = Buffer.alloc(16);
  setTimespec(b, ms);
  return b;
}

export function setTimespec(b: Buffer, ms: number): void {
  const sec = Math.floor(ms / 1000);
  b.writeBigInt64LE(BigInt(sec), 0);
  b.writeBigInt64LE(BigInt(Math.round((ms - sec * 1000) * 1e6)), 8);
}

/** Process start time (clock ticks since boot) from /proc, or -1 if the process is gone. */
export function procStartTime(pid: number): number {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // fields after comm: state(3) ppid(4) ... starttime is field 22 → index 19 here
    if (rest[0] === 'Z' || rest[0] === 'X') return -1;
    return Number(rest[19]);
  } catch {
    return -1;
  }
}

/** True while the process `pid` started at `start` (from procStartTime) is alive. */
export function processAlive(pid: number, start: number): boolean {
  if (pid <= 0) return false;
  const now = procStartTime(pid);
  return now !== -1 && (start <= 0 || now === start);
}

const getrusageFn = libc.func('int getrusage(int who, _Out_ uint8_t *usage)');
const RUSAGE_THREAD = 1;
const RU_NIVCSW = 136; // struct rusage: two timevals, then 14 longs; ru_nivcsw is the last
const rusage = Buffer.alloc(144);

/** How often the calling thread has been preempted (involuntary context switches). */
export function threadPreemptions(): number {
  if (getrusageFn(RUSAGE_THREAD, rusage) !== 0) return 0;
  return Number(rusage.readBigInt64LE(RU_NIVCSW));
}

/** CPU time (user+system, µs) this process has used so far, from /proc/self/stat. */
export function selfCpuMicros(): number {
  const u = process.cpuUsage();
  return u.user + u.system;
}
