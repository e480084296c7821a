// Blocking descriptor I/O for the control/data server thread: every read waits in poll(2)
// with a deadline first, so a silent or half-sent peer costs a timeout, never a hung thread.
import { EAGAIN, EINTR, POLLIN, sysPollIn, sysRead, sysPoll, POLLOUT } from '../base/libc.ts';
import { sysSend } from '../base/libc-sockets.ts';

export type ReadResult = 'ok' | 'eof' | 'timeout' | 'error';

const pfd = Buffer.alloc(8);

/** Read exactly `len` bytes into buf[off..]; the clock restarts whenever bytes arrive
 *  (a slow sender is fine, a stalled one is not). */
export function readFull(fd: number, buf: Uint8Array, off: number, len: number, idleMs: number): ReadResult {
  let got = 0;
  while (got < len) {
    const ready = sysPollIn(fd, idleMs, pfd);
    if (ready === -EINTR) continue;
    if (ready < 0) return 'error';
    if (ready === 0) return 'timeout';
    const n = sysRead(fd, buf.subarray(off + got), len - got);
    if (n === -EINTR || n === -EAGAIN) continue;
    if (n < 0) return 'error';
    if (n === 0) return 'eof';
    got += n;
  }
  return 'ok';
}

const pfdOut = Buffer.alloc(8);
const revOut = [0];

/** Send all of `data` (MSG_NOSIGNAL: a vanished peer is an error, not SIGPIPE). */
export function writeAll(fd: number, data: Uint8Array, timeoutMs = 5000): boolean {
  let sent = 0;
  while (sent < data.length) {
    const n = sysSend(fd, data.subarray(sent), data.length - sent);
    if (n === -EINTR) continue;
    if (n === -EAGAIN) {
      if (sysPoll([fd], [POLLOUT], timeoutMs, pfdOut, revOut) <= 0) return false;
      continue;
    }
    if (n <= 0) return false;
    sent += n;
  }
  return true;
}

const drainBuf = new Uint8Array(4096);

/** Throw away input until the peer has been quiet for `quietMs` (at most `maxMs` in all):
 *  after a frame that cannot be parsed the rest of it must not be read as commands. */
export function drain(fd: number, quietMs = 100, maxMs = 2000): ReadResult {
  const until = Date.now() + maxMs;
  while (Date.now() < until) {
    const ready = sysPollIn(fd, quietMs, pfd);
    if (ready === -EINTR) continue;
    if (ready < 0) return 'error';
    if (ready === 0) return 'ok';
    if (!(ready & POLLIN)) return 'eof';
    const n = sysRead(fd, drainBuf, drainBuf.length);
    if (n === -EINTR || n === -EAGAIN) continue;
    if (n < 0) return 'error';
    if (n === 0) return 'eof';
  }
  return 'ok';
}
