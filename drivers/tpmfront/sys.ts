// libc calls the FUSE front ends need, through koffi: the /dev/fuse descriptor (open, read,
// write, poll, close), mount(2)/umount2(2), and a SOCK_SEQPACKET socketpair so the serve
// loop can be driven by tests with a message-preserving fd like /dev/fuse.
// All blocking calls here are for worker threads (or quick non-blocking ones on main).
import koffi from 'koffi';
import { VtpmError, type VtpmErrorCode } from '../base/errors.ts';

const libc = koffi.load('libc.so.6');
const fns = {
  open: libc.func('int open(const char *path, int flags, int mode)'),
  read: libc.func('long read(int fd, void *buf, unsigned long count)'),
  write: libc.func('long write(int fd, const void *buf, unsigned long count)'),
  poll: libc.func('int poll(void *fds, unsigned long nfds, int timeout)'),
  close: libc.func('int close(int fd)'),
  mount: libc.func('int mount(const char *src, const char *target, const char *type, unsigned long flags, const char *data)'),
  umount2: libc.func('int umount2(const char *target, int flags)'),
  socketpair: libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  strerror: libc.func('const char *strerror(int errnum)'),
};

export const ERRNO = koffi.os.errno as Record<string, number>;
export const O_RDWR = 0o2;
export const O_CLOEXEC = 0o2000000;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;
const AF_UNIX = 1;
const SOCK_SEQPACKET = 5;
const SOCK_CLOEXEC = 0o2000000;
export const POLLIN = 1;

export function errnoName(errno: number): string {
  return Object.entries(ERRNO).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`;
}

export function sysError(what: string, errno: number): VtpmError {
  const code: VtpmErrorCode =
    errno === ERRNO.EBUSY ? 'EBUSY' : errno === ERRNO.ENOENT ? 'ENOENT' : errno === ERRNO.EPERM || errno === ERRNO.EACCES ? 'EPERM' : 'EIO';
  return new VtpmError(code, `${what}: ${errnoName(errno)} (${fns.strerror(errno) as string})`);
}

/** read(2); returns bytes read or -errno. */
export function sysRead(fd: number, buf: Uint8Array, len: number): number {
  const r = Number(fns.read(fd, buf, len));
  return r < 0 ? -koffi.errno() : r;
}

/** write(2); returns bytes written or -errno. */
export function sysWrite(fd: number, buf: Uint8Array, len: number): number {
  const r = Number(fns.write(fd, buf, len));
  return r < 0 ? -koffi.errno() : r;
}

/** poll(2) for POLLIN on one fd; `pfd` is an 8-byte scratch buffer. Returns revents, 0 on
 *  timeout, or -errno. */
export function sysPollIn(fd: number, timeoutMs: number, pfd: Buffer): number {
  pfd.writeInt32LE(fd, 0);
  pfd.writeInt16LE(POLLIN, 4);
  pfd.writeInt16LE(0, 6);
  const r = fns.poll(pfd, 1, Math.max(0, Math.min(Math.ceil(timeoutMs), 0x7fffffff))) as number;
  if (r < 0) return -koffi.errno();
  return r === 0 ? 0 : pfd.readInt16LE(6) || POLLIN;
}

export function sysOpen(path: string, flags: number): number {
  const fd = fns.open(path, flags, 0) as number;
  if (fd < 0) throw sysError(`open ${path}`, koffi.errno());
  return fd;
}

export function sysClose(fd: number): void {
  fns.close(fd);
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
