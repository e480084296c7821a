// A TPM character device (/dev/tpm0, /dev/tpmrm0, or a served tpm0 node) through koffi
// system calls: open, write, poll, read, close, as tpm2-tss' device TCTI uses them. Calls
// that may block go through koffi's async path (a libuv worker), never the JS thread.
import { ERRNO, O_CLOEXEC, O_NONBLOCK, O_RDWR, POLLERR, POLLHUP, POLLIN, sysAsync, sysError } from '../base/libc.ts';
import { parseHeader, TPM_HEADER_SIZE } from '../tpm/command.ts';
import { VtpmError } from '../base/errors.ts';
import { DEFAULT_COMMAND_TIMEOUT_MS } from '../tpm/durations.ts';
import { CommandQueue } from '../tpm/serial.ts';
import type { HardwareTpm } from '../tpm/transport.ts';

const BUFFER = 4096;

export interface TpmDeviceOptions {
  /** How long a response may take (poll timeout), ms; default the command core's (Linux's
   *  2 min): the kernel driver below applies the per-command durations itself. */
  responseTimeoutMs?: number;
}

export class TpmDevice implements HardwareTpm {
  readonly description: string;
  private readonly queue = new CommandQueue();
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
    this.timeoutMs = opts.responseTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
  }

  /** Open the device; a TPM already opened by someone else answers EBUSY (tpm-dev rule). */
  static async open(path: string, opts: TpmDeviceOptions = {}): Promise<TpmDevice> {
    const fd = await sysAsync.open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) throw sysError(`cannot open ${path}`, -fd);
    return new TpmDevice(fd, path, opts);
  }

  transmit(command: Uint8Array): Promise<Uint8Array> {
    return this.queue.run(() => this.send(command));
  }

  private async send(cmd: Uint8Array): Promise<Uint8Array> {
    if (this.fd < 0) throw new VtpmError('ECLOSED', `${this.path} is closed`);
    if (cmd.length < TPM_HEADER_SIZE || cmd.length > BUFFER) throw new VtpmError('EINVAL', `command of ${cmd.length} bytes (10..${BUFFER})`);
    const n = await sysAsync.write(this.fd, cmd, cmd.length);
    if (n < 0) throw sysError(`write to ${this.path}`, -n);
    if (n !== cmd.length) throw new VtpmError('EIO', `short write to ${this.path}: ${n} of ${cmd.length} bytes`);
    // Header first, then the rest: a device may hand the response out in pieces.
    let got = 0;
    let size = TPM_HEADER_SIZE;
    const deadline = Date.now() + this.timeoutMs;
    while (got < size) {
      await this.waitReadable(deadline);
      const r = await sysAsync.read(this.fd, this.buf.subarray(got), size - got);
      if (r < 0) {
        if (r === -ERRNO.EAGAIN) continue;
        throw sysError(`read from ${this.path}`, -r);
      }
      if (r === 0) throw new VtpmError('EIO', `${this.path} gave no response (${got} of ${size} bytes read)`);
      got += r;
      if (size === TPM_HEADER_SIZE && got >= TPM_HEADER_SIZE) {
        size = parseHeader(this.buf.subarray(0, TPM_HEADER_SIZE), `response from ${this.path}`, { whole: false, max: BUFFER }).size;
      }
    }
    return new Uint8Array(this.buf.subarray(0, size));
  }

  private async waitReadable(deadline: number): Promise<void> {
    const left = deadline - Date.now();
    if (left <= 0) throw new VtpmError('ETIMEDOUT', `no response from ${this.path} within ${this.timeoutMs} ms`);
    const rev = await sysAsync.pollIn(this.fd, left, this.pfd);
    if (rev < 0) {
      if (rev === -ERRNO.EINTR) return;
      throw sysError(`poll on ${this.path}`, -rev);
    }
    if (rev === 0) throw new VtpmError('ETIMEDOUT', `no response from ${this.path} within ${this.timeoutMs} ms`);
    if (!(rev & POLLIN) && rev & (POLLERR | POLLHUP)) throw new VtpmError('EIO', `${this.path} reported an error (poll revents 0x${rev.toString(16)})`);
  }

  async close(): Promise<void> {
    await this.queue.idle();
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    const r = await sysAsync.close(fd);
    if (r < 0) throw sysError(`close ${this.path}`, -r);
  }
}
