// The one libc binding of the stack, through koffi (libtpms' own binding only borrows
// libc's free): the errno → VtpmErrorCode mapping; file descriptors (open, read, write,
// poll, close, in a blocking form for worker threads and an async form that runs on a
// libuv worker for event-loop callers); mount(2)/umount2(2); a SOCK_SEQPACKET socketpair
// (a message-preserving fd like /dev/fuse, for tests); the process environment as every
// thread sees it; mmap/munmap of a shared file and futex(2) on a word of such a mapping
// (FUTEX_WAIT / FUTEX_WAKE without FUTEX_PRIVATE_FLAG, so the key is the file page and two
// processes, or two mappings in one process, meet on the same word); /proc helpers.
//
// Works in the main thread and in worker_threads alike (koffi loads once per isolate).
// Linux only (x86_64 and aarch64 syscall numbers below).

import koffi from 'koffi';
import fs from 'node:fs';
import { VtpmError, type VtpmErrorCode } from './errors.ts';

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

/** The loaded libc (libc-sockets.ts declares its functions on the same handle). */
export const libc = koffi.load('libc.so.6');

// ---- errno ----

export const ERRNO = koffi.os.errno as Record<string, number>;

export function errnoName(errno: number): string {
  return Object.entries(ERRNO).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`;
}

/** The stack's code for a failed system call's errno. */
export function errnoCode(errno: number): VtpmErrorCode {
  if (errno === ERRNO.EBUSY) return 'EBUSY';
  if (errno === ERRNO.ENOENT) return 'ENOENT';
  if (errno === ERRNO.EPERM || errno === ERRNO.EACCES) return 'EPERM';
  return 'EIO';
}

const strerrorFn = libc.func('const char *strerror(int errnum)');

/** `what: ENAME (text)` with the code errnoCode gives. */
export function sysError(what: string, errno: number): VtpmError {
  return new VtpmError(errnoCode(errno), `${what}: ${errnoName(errno)} (${strerrorFn(errno) as string})`);
}

// ---- file descriptors, mount, sockets ----

export const O_RDWR = 0o2;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
export const POLLIN = 0x1;
export const POLLERR = 0x8;
export const POLLHUP = 0x10;
export const POLLOUT = 0x4;
export const POLLNVAL = 0x20;
export const AF_UNIX = 1;
const SOCK_SEQPACKET = 5;
export const SOCK_CLOEXEC = 0o2000000;

const fns = {
  open: libc.func('int open(const char *path, int flags, int mode)'),
  read: libc.func('long read(int fd, void *buf, unsigned long count)'),
  write: libc.func('long write(int fd, const void *buf, unsigned long count)'),
  poll: libc.func('int poll(void *fds, unsigned long nfds, int timeout)'),
  close: libc.func('int close(int fd)'),
  dup2: libc.func('int dup2(int oldfd, int newfd)'),
  mount: libc.func('int mount(const char *src, const char *target, const char *type, unsigned long flags, const char *data)'),
  umount2: libc.func('int umount2(const char *target, int flags)'),
  socketpair: libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
};

/** A result or -errno: the convention of every call below. */
/** A call's result, or -errno when it failed. */
export const orErrno = (r: number | bigint): number => (Number(r) < 0 ? -koffi.errno() : Number(r));

/** read(2); returns bytes read or -errno. */
export function sysRead(fd: number, buf: Uint8Array, len: number): number {
  return orErrno(fns.read(fd, buf, len));
}

/** write(2); returns bytes written or -errno. */
export function sysWrite(fd: number, buf: Uint8Array, len: number): number {
  return orErrno(fns.write(fd, buf, len));
}

function pollFd(pfd: Buffer, fd: number): void {
  pfd.writeInt32LE(fd, 0);
  pfd.writeInt16LE(POLLIN, 4);
  pfd.writeInt16LE(0, 6);
}
const pollMs = (ms: number) => Math.max(0, Math.min(Math.ceil(ms), 0x7fffffff));
const revents = (r: number, pfd: Buffer) => (r <= 0 ? r : pfd.readInt16LE(6) || POLLIN);

/** poll(2) for POLLIN on one fd; `pfd` is an 8-byte scratch buffer. Returns revents, 0 on
 *  timeout, or -errno. */
export function sysPollIn(fd: number, timeoutMs: number, pfd: Buffer): number {
  pollFd(pfd, fd);
  return revents(orErrno(fns.poll(pfd, 1, pollMs(timeoutMs))), pfd);
}

export function sysOpen(path: string, flags: number): number {
  const fd = fns.open(path, flags, 0) as number;
  if (fd < 0) throw sysError(`open ${path}`, koffi.errno());
  return fd;
}

export function sysClose(fd: number): void {
  fns.close(fd);
}

/** dup2(2): make `newfd` refer to what `oldfd` does (a daemon moving its stdout/stderr to
 *  another log once it knows whose it is). */
export function sysDup2(oldfd: number, newfd: number): void {
  const r = orErrno(fns.dup2(oldfd, newfd) as number);
  if (r < 0) throw new VtpmError('EIO', `dup2(${oldfd}, ${newfd}) failed (errno ${-r})`);
}

export function sysMount(src: string, target: string, type: string, flags: number, data: string): void {
  if ((fns.mount(src, target, type, flags, data) as number) < 0) throw sysError(`mount ${type} on ${target}`, koffi.errno());
}

/** umount2(2); returns 0 or -errno (callers decide which errors matter). */
export function sysUmount(target: string, flags: number): number {
  return (fns.umount2(target, flags) as number) < 0 ? -koffi.errno() : 0;
}

/** A SOCK_SEQPACKET pair: each write is one message, each read one message, like /dev/fuse. */
export function seqpacketPair(): [number, number] {
  const sv = [0, 0];
  if ((fns.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) as number) < 0) throw sysError('socketpair', koffi.errno());
  return [sv[0]!, sv[1]!];
}

type AsyncFn = { async: (...args: unknown[]) => void };
/** Run one call on koffi's worker (never blocking the event loop); resolves with the
 *  result or -errno. */
function callAsync(fn: unknown, ...args: unknown[]): Promise<number> {
  return new Promise((resolve, reject) => {
    (fn as AsyncFn).async(...args, (err: unknown, res: number | bigint) => {
      if (err) reject(new VtpmError('EIO', 'system call failed to run', { cause: err }));
      else resolve(orErrno(res));
    });
  });
}

/** The fd calls for an event-loop caller: same results as the sync forms (or -errno). */
export const sysAsync = {
  open: (path: string, flags: number): Promise<number> => callAsync(fns.open, path, flags, 0),
  read: (fd: number, buf: Uint8Array, len: number): Promise<number> => callAsync(fns.read, fd, buf, len),
  write: (fd: number, buf: Uint8Array, len: number): Promise<number> => callAsync(fns.write, fd, buf, len),
  close: (fd: number): Promise<number> => callAsync(fns.close, fd),
  async pollIn(fd: number, timeoutMs: number, pfd: Buffer): Promise<number> {
    pollFd(pfd, fd);
    return revents(await callAsync(fns.poll, pfd, 1, pollMs(timeoutMs)), pfd);
  },
};

// ---- environment ----

// libc's own environment, not process.env (a per-isolate copy): what every thread of the
// process sees at once, as a process-wide claim needs.
const getenvFn = libc.func('const char *getenv(const char *name)');
const setenvFn = libc.func('int setenv(const char *name, const char *value, int overwrite)');
const unsetenvFn = libc.func('int unsetenv(const char *name)');

export function getenv(name: string): string | undefined {
  return (getenvFn(name) as string | null) ?? undefined;
}
export function setenv(name: string, value: string): void {
  if ((setenvFn(name, value, 1) as number) < 0) throw sysError(`setenv ${name}`, koffi.errno());
}
export function unsetenv(name: string): void {
  unsetenvFn(name);
}

// ---- shared mappings and futexes ----

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
export function futexWaitAsync(addr: bigint, expected: number, ts: Buffer | null, cb: (code: number) => void): void {
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

// ---- /proc and scheduling ----

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

/** poll(2) on several fds. `events[i]` for `fds[i]` (a negative fd is skipped, as poll does);
 *  `pfds` is scratch of at least 8 * fds.length bytes; revents land in `out`. Returns the
 *  number of ready fds, 0 on timeout (timeoutMs < 0: wait for ever), or -errno. */
export function sysPoll(fds: readonly number[], events: readonly number[], timeoutMs: number, pfds: Buffer, out: number[]): number {
  for (let i = 0; i < fds.length; i++) {
    pfds.writeInt32LE(fds[i]!, 8 * i);
    pfds.writeInt16LE(events[i]!, 8 * i + 4);
    pfds.writeInt16LE(0, 8 * i + 6);
  }
  const r = orErrno(fns.poll(pfds, fds.length, timeoutMs < 0 ? -1 : pollMs(timeoutMs)));
  for (let i = 0; i < fds.length; i++) out[i] = r > 0 ? pfds.readInt16LE(8 * i + 6) : 0;
  return r;
}
