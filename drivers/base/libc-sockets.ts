// Unix stream sockets, descriptor passing (SCM_RIGHTS), pipes and shutdown: what the swtpm
// control channel needs (QEMU hands its data channel over with SET_DATAFD). On the one libc
// binding (libc.ts), blocking calls for worker threads.
import koffi from 'koffi';
import fs from 'node:fs';
import { VtpmError } from './errors.ts';
import { AF_UNIX, libc, O_CLOEXEC, orErrno, SOCK_CLOEXEC, sysClose, sysError } from './libc.ts';


const SOCK_STREAM = 1;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_NOSIGNAL = 0x4000;
const MSG_CTRUNC = 0x8;
const SUN_PATH_MAX = 108;

const sockFns = {
  socketpair: libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  bind: libc.func('int bind(int fd, const void *addr, uint32_t len)'),
  listen: libc.func('int listen(int fd, int backlog)'),
  accept4: libc.func('int accept4(int fd, void *addr, void *addrlen, int flags)'),
  connect: libc.func('int connect(int fd, const void *addr, uint32_t len)'),
  recvmsg: libc.func('long recvmsg(int fd, void *msg, int flags)'),
  sendmsg: libc.func('long sendmsg(int fd, const void *msg, int flags)'),
  send: libc.func('long send(int fd, const void *buf, unsigned long len, int flags)'),
  pipe2: libc.func('int pipe2(_Out_ int *fds, int flags)'),
  shutdown: libc.func('int shutdown(int fd, int how)'),
};

function sockaddrUn(path: string): Buffer {
  const p = Buffer.from(path);
  if (p.length >= SUN_PATH_MAX) throw new VtpmError('EINVAL', `unix socket path of ${p.length} bytes is too long (max ${SUN_PATH_MAX - 1}): ${path}`);
  const a = Buffer.alloc(2 + SUN_PATH_MAX);
  a.writeUInt16LE(AF_UNIX, 0);
  p.copy(a, 2);
  return a;
}

/** A listening SOCK_STREAM unix socket at `path` (an existing socket file is replaced). */
export function unixListen(path: string, backlog = 4): number {
  const fd = sockFns.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw sysError('socket', koffi.errno());
  try {
    fs.rmSync(path, { force: true });
    const a = sockaddrUn(path);
    if ((sockFns.bind(fd, a, a.length) as number) < 0) throw sysError(`bind ${path}`, koffi.errno());
    if ((sockFns.listen(fd, backlog) as number) < 0) throw sysError(`listen ${path}`, koffi.errno());
    return fd;
  } catch (e) {
    sysClose(fd);
    throw e;
  }
}

/** A blocking SOCK_STREAM connection to the unix socket at `path`. */
export function unixConnect(path: string): number {
  const fd = sockFns.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw sysError('socket', koffi.errno());
  const a = sockaddrUn(path);
  if ((sockFns.connect(fd, a, a.length) as number) < 0) {
    const errno = koffi.errno();
    sysClose(fd);
    throw sysError(`connect ${path}`, errno);
  }
  return fd;
}

/** accept4(2) with SOCK_CLOEXEC; returns the new fd or -errno. */
export function sysAccept(fd: number): number {
  return orErrno(sockFns.accept4(fd, null, null, SOCK_CLOEXEC));
}

/** A SOCK_STREAM socketpair (what QEMU hands swtpm as its data channel). */
export function streamPair(): [number, number] {
  const sv = [0, 0];
  if ((sockFns.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) as number) < 0) throw sysError('socketpair', koffi.errno());
  return [sv[0]!, sv[1]!];
}

/** pipe2(O_CLOEXEC): [read end, write end] (a stop signal a blocking poll loop can wait on). */
export function sysPipe(): [number, number] {
  const p = [0, 0];
  if ((sockFns.pipe2(p, O_CLOEXEC) as number) < 0) throw sysError('pipe2', koffi.errno());
  return [p[0]!, p[1]!];
}

/** send(2) with MSG_NOSIGNAL (a peer gone is EPIPE, not a signal); bytes sent or -errno. */
export function sysSend(fd: number, buf: Uint8Array, len: number): number {
  return orErrno(sockFns.send(fd, buf, len, MSG_NOSIGNAL));
}

// struct msghdr (x86_64/aarch64 LP64): name 0, namelen 8, iov 16, iovlen 24, control 32,
// controllen 40, flags 48; size 56. struct iovec 16 bytes. One cmsghdr (len 8, level 4,
// type 4) with one int: CMSG_LEN = 20, CMSG_SPACE = 24. The data moves through a native
// scratch block (iov_base needs a stable address), so one call carries at most
// MSG_SCRATCH bytes.
const MSG_SCRATCH = 16384;
const MSGHDR = 0;
const IOVEC = 64;
const CONTROL = 96;
const CONTROL_SPACE = 32;
const DATA = 128;
let msgBlock: { ptr: unknown; addr: bigint; view: DataView; bytes: Uint8Array } | null = null;
function msgScratch(): NonNullable<typeof msgBlock> {
  if (!msgBlock) {
    const ptr = koffi.alloc('uint8_t', DATA + MSG_SCRATCH);
    const ab = koffi.view(ptr, DATA + MSG_SCRATCH);
    msgBlock = { ptr, addr: koffi.address(ptr), view: new DataView(ab), bytes: new Uint8Array(ab) };
  }
  return msgBlock;
}
function prepareMsg(m: NonNullable<typeof msgBlock>, len: number, controlLen: number): void {
  m.bytes.fill(0, 0, DATA);
  const v = m.view;
  v.setBigUint64(IOVEC, m.addr + BigInt(DATA), true);
  v.setBigUint64(IOVEC + 8, BigInt(len), true);
  v.setBigUint64(MSGHDR + 16, m.addr + BigInt(IOVEC), true);
  v.setBigUint64(MSGHDR + 24, 1n, true);
  v.setBigUint64(MSGHDR + 32, controlLen ? m.addr + BigInt(CONTROL) : 0n, true);
  v.setBigUint64(MSGHDR + 40, BigInt(controlLen), true);
}

export interface RecvResult {
  /** Bytes received (0 = peer closed) or -errno. */
  n: number;
  /** Descriptors that came along (SCM_RIGHTS); the caller owns (and must close) them. */
  fds: number[];
}

/** recvmsg(2) into `buf` (at most min(len, 16 KiB) bytes), collecting passed descriptors
 *  (received with MSG_CMSG_CLOEXEC). */
export function sysRecvmsg(fd: number, buf: Uint8Array, len: number): RecvResult {
  const m = msgScratch();
  const want = Math.min(len, MSG_SCRATCH, buf.length);
  prepareMsg(m, want, CONTROL_SPACE);
  const MSG_CMSG_CLOEXEC = 0x40000000;
  const n = orErrno(sockFns.recvmsg(fd, m.addr, MSG_CMSG_CLOEXEC));
  const fds: number[] = [];
  if (n < 0) return { n, fds };
  buf.set(m.bytes.subarray(DATA, DATA + n));
  const v = m.view;
  const controlLen = Number(v.getBigUint64(MSGHDR + 40, true));
  // Walk the cmsg headers the kernel filled in (CMSG_NXTHDR: 8-byte aligned lengths).
  for (let off = 0; off + 16 <= controlLen; ) {
    const cl = Number(v.getBigUint64(CONTROL + off, true));
    if (cl < 16 || off + cl > controlLen) break;
    if (v.getInt32(CONTROL + off + 8, true) === SOL_SOCKET && v.getInt32(CONTROL + off + 12, true) === SCM_RIGHTS) {
      for (let p = 16; p + 4 <= cl; p += 4) fds.push(v.getInt32(CONTROL + off + p, true));
    }
    off += (cl + 7) & ~7;
  }
  if (v.getInt32(MSGHDR + 48, true) & MSG_CTRUNC) {
    // More descriptors were sent than fit: the kernel closed the rest; keep what we got.
  }
  return { n, fds };
}

/** sendmsg(2) of `buf` (at most 16 KiB) with `passFd` attached as SCM_RIGHTS (when >= 0);
 *  bytes sent or -errno. */
export function sysSendmsg(fd: number, buf: Uint8Array, passFd = -1): number {
  if (buf.length > MSG_SCRATCH) throw new VtpmError('EOVERSIZE', `sendmsg of ${buf.length} bytes exceeds ${MSG_SCRATCH}`);
  const m = msgScratch();
  prepareMsg(m, buf.length, passFd >= 0 ? 24 : 0);
  m.bytes.set(buf, DATA);
  if (passFd >= 0) {
    m.view.setBigUint64(CONTROL, 20n, true);
    m.view.setInt32(CONTROL + 8, SOL_SOCKET, true);
    m.view.setInt32(CONTROL + 12, SCM_RIGHTS, true);
    m.view.setInt32(CONTROL + 16, passFd, true);
  }
  return orErrno(sockFns.sendmsg(fd, m.addr, MSG_NOSIGNAL));
}

/** shutdown(2) both directions: wakes a peer blocked on the socket; 0 or -errno. */
export function sysShutdown(fd: number): number {
  return orErrno(sockFns.shutdown(fd, 2));
}
