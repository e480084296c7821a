// A TPM character device (/dev/tpm0, /dev/tpmrm0, or a served tpm0 node) through koffi
// system calls: open, write, poll, read, close, as tpm2-tss' device TCTI uses them. Calls
// that may block go through koffi's async path (a libuv worker), never the JS thread.
import koffi from 'koffi';
import { TPM_HEADER_SIZE } from '../tpm/command.ts';
import { VtpmError, type VtpmErrorCode } from '../base/errors.ts';
import type { HardwareTpm } from '../tpm/transport.ts';

const libc = koffi.load('libc.so.6');
const sys = {
  open: libc.func('int open(const char *path, int flags, int mode)'),
  write: libc.func('long write(int fd, const void *buf, unsigned long count)'),
  read: libc.func('long read(int fd, void *buf, unsigned long count)'),
  poll: libc.func('int poll(void *fds, unsigned long nfds, int timeout)'),
  close: libc.func('int close(int fd)'),
};
const E = koffi.os.errno;
const O_RDWR = 0o2;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const POLLIN = 0x1;
const POLLERR = 0x8;
const POLLHUP = 0x10;
const BUFFER = 4096;

type AsyncFn = { async: (...args: unknown[]) => void };
/** Run one system call on koffi's worker; resolves with [result, errno]. */
function call(fn: unknown, ...args: unknown[]): Promise<[number, number]> {
  return new Promise((resolve, reject) => {
    (fn as AsyncFn).async(...args, (err: unknown, res: number | bigint) => {
      if (err) reject(new VtpmError('EIO', 'system call failed to run', { cause: err }));
      else resolve([Number(res), Number(res) < 0 ? koffi.errno() : 0]);
    });
  });
}

function errnoError(what: string, errno: number, path: string): VtpmError {
  const name = Object.entries(E).find(([, v]) => v === errno)?.[0] ?? `errno ${errno}`;
  const code: VtpmErrorCode = errno === E.EBUSY ? 'EBUSY' : errno === E.ENOENT ? 'ENOENT' : errno === E.EACCES || errno === E.EPERM ? 'EPERM' : 'EIO';
  return new VtpmError(code, `${what} ${path}: ${name}`);
}

export interface TpmDeviceOptions {
  /** How long a response may take (poll timeout), ms. Linux allows up to 2 min by default. */
  responseTimeoutMs?: number;
}

export class TpmDevice implements HardwareTpm {
  readonly description: string;
  private queue: Promise<unknown> = Promise.resolve();
  private fd: number;
  private readonly buf = Buffer.alloc(BUFFER);
  private readonly pfd = Buffer.alloc(8);
  private readonly timeoutMs: number;

  private constructor(
    fd: number,
    readonly path: string,
    opts: TpmDeviceOptions,
  ) {
    this.fd = fd;
    this.description = `TPM device ${path}`;
    this.timeoutMs = opts.responseTimeoutMs ?? 120_000;
  }

  /** Open the device; a TPM already opened by someone else answers EBUSY (tpm-dev rule). */
  static async open(path: string, opts: TpmDeviceOptions = {}): Promise<TpmDevice> {
    const [fd, errno] = await call(sys.open, path, O_RDWR | O_NONBLOCK | O_CLOEXEC, 0);
    if (fd < 0) throw errnoError('cannot open', errno, path);
    return new TpmDevice(fd, path, opts);
  }

  transmit(command: Uint8Array): Promise<Uint8Array> {
    const run = this.queue.then(() => this.send(command));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async send(cmd: Uint8Array): Promise<Uint8Array> {
    if (this.fd < 0) throw new VtpmError('ECLOSED', `${this.path} is closed`);
    if (cmd.length < TPM_HEADER_SIZE || cmd.length > BUFFER) throw new VtpmError('EINVAL', `command of ${cmd.length} bytes (10..${BUFFER})`);
    const [n, werr] = await call(sys.write, this.fd, cmd, cmd.length);
    if (n < 0) throw errnoError('write to', werr, this.path);
    if (n !== cmd.length) throw new VtpmError('EIO', `short write to ${this.path}: ${n} of ${cmd.length} bytes`);
    // Header first, then the rest: a device may hand the response out in pieces.
    let got = 0;
    let size = TPM_HEADER_SIZE;
    const deadline = Date.now() + this.timeoutMs;
    while (got < size) {
      await this.waitReadable(deadline);
      const [r, rerr] = await call(sys.read, this.fd, this.buf.subarray(got), size - got);
      if (r < 0) {
        if (rerr === E.EAGAIN) continue;
        throw errnoError('read from', rerr, this.path);
      }
      if (r === 0) throw new VtpmError('EIO', `${this.path} gave no response (${got} of ${size} bytes read)`);
      got += r;
      if (size === TPM_HEADER_SIZE && got >= TPM_HEADER_SIZE) {
        size = this.buf.readUInt32BE(2);
        if (size < TPM_HEADER_SIZE || size > BUFFER) throw new VtpmError('EIO', `response size field ${size} from ${this.path} out of range`);
      }
    }
    return new Uint8Array(this.buf.subarray(0, size));
  }

  private async waitReadable(deadline: number): Promise<void> {
    const left = deadline - Date.now();
    if (left <= 0) throw new VtpmError('ETIMEDOUT', `no response from ${this.path} within ${this.timeoutMs} ms`);
    this.pfd.writeInt32LE(this.fd, 0);
    this.pfd.writeInt16LE(POLLIN, 4);
    this.pfd.writeInt16LE(0, 6);
    const [n, err] = await call(sys.poll, this.pfd, 1, Math.min(left, 0x7fffffff));
    if (n < 0) {
      if (err === E.EINTR) return;
      throw errnoError('poll on', err, this.path);
    }
    if (n === 0) throw new VtpmError('ETIMEDOUT', `no response from ${this.path} within ${this.timeoutMs} ms`);
    const rev = this.pfd.readInt16LE(6);
    if (!(rev & POLLIN) && rev & (POLLERR | POLLHUP)) throw new VtpmError('EIO', `${this.path} reported an error (poll revents 0x${rev.toString(16)})`);
  }

  async close(): Promise<void> {
    await this.queue;
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    const [r, err] = await call(sys.close, fd);
    if (r < 0) throw errnoError('close', err, this.path);
  }
}
