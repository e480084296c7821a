// A TPM on a stream socket (TCP host:port or a unix socket path) as a TpmTransport: raw
// command bytes out, raw response bytes back, framed by the response header's size field.
// This is swtpm's data channel (`swtpm socket --server ...`) and the mssim/ibmswtpm2 wire
// without its extra framing. Locality is not carried on this channel (swtpm sets it on its
// control channel), so only locality 0 is accepted.
import * as net from 'node:net';
import { VtpmError } from '../base/errors.ts';
import { parseHeader, TPM_HEADER_SIZE, TPM_MAX_COMMAND_SIZE } from './command.ts';
import { commandTimeoutMs } from './durations.ts';
import { CommandQueue } from './serial.ts';
import type { TpmTransport } from './transport.ts';

export type SocketAddress = { host: string; port: number } | { path: string };

export interface SocketTransportOptions {
  /** Bound on every response (ms); default the command core's duration for each command. */
  timeoutMs?: number;
  connectTimeoutMs?: number;
  /** Largest response accepted (bytes). */
  maxResponse?: number;
}

const where = (a: SocketAddress) => ('path' in a ? a.path : `${a.host}:${a.port}`);

interface Pending {
  resolve: (r: Uint8Array) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class SocketTransport implements TpmTransport {
  readonly description: string;
  private readonly queue = new CommandQueue();
  private readonly buf: Uint8Array;
  private got = 0;
  private size = 0; // the response's size once its header is in
  private pending: Pending | undefined;
  private dead: VtpmError | undefined;

  private constructor(
    private readonly sock: net.Socket,
    address: SocketAddress,
    private readonly o: SocketTransportOptions,
  ) {
    this.description = `TPM socket ${where(address)}`;
    this.buf = new Uint8Array(o.maxResponse ?? TPM_MAX_COMMAND_SIZE);
    sock.setNoDelay?.(true);
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', (e) => this.fail(new VtpmError('ECLOSED', `${this.description} failed`, { cause: e })));
    sock.on('close', () => this.fail(new VtpmError('ECLOSED', `${this.description} closed the connection`)));
  }

  static connect(address: SocketAddress, o: SocketTransportOptions = {}): Promise<SocketTransport> {
    const ms = o.connectTimeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      const sock = 'path' in address ? net.connect(address.path) : net.connect(address.port, address.host);
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new VtpmError('ETIMEDOUT', `cannot connect to TPM socket ${where(address)} within ${ms} ms`));
      }, ms);
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(new VtpmError((e as NodeJS.ErrnoException).code === 'ENOENT' ? 'ENOENT' : 'EIO', `cannot connect to TPM socket ${where(address)}`, { cause: e }));
      });
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new SocketTransport(sock, address, o));
      });
    });
  }

  transmit(command: Uint8Array, locality = 0): Promise<Uint8Array> {
    if (locality !== 0) return Promise.reject(new VtpmError('EINVAL', `${this.description} carries no locality (asked for ${locality})`));
    return this.queue.run(() => this.send(command));
  }

  private send(cmd: Uint8Array): Promise<Uint8Array> {
    if (this.dead) return Promise.reject(this.dead);
    if (cmd.length < TPM_HEADER_SIZE) return Promise.reject(new VtpmError('EINVAL', `command of ${cmd.length} bytes is shorter than its header`));
    const ms = this.o.timeoutMs ?? commandTimeoutMs(cmd);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new VtpmError('ETIMEDOUT', `no response from ${this.description} within ${ms} ms`)), ms);
      this.pending = { resolve, reject, timer };
      this.got = 0;
      this.size = 0;
      this.sock.write(cmd);
    });
  }

  private onData(d: Buffer): void {
    if (!this.pending) return this.fail(new VtpmError('EPROTO', `${this.description} sent ${d.length} bytes nobody asked for`));
    let off = 0;
    while (off < d.length) {
      const want = (this.size || TPM_HEADER_SIZE) - this.got;
      const n = Math.min(want, d.length - off);
      this.buf.set(d.subarray(off, off + n), this.got);
      this.got += n;
      off += n;
      if (this.size === 0 && this.got === TPM_HEADER_SIZE) {
        try {
          this.size = parseHeader(this.buf.subarray(0, TPM_HEADER_SIZE), `response from ${this.description}`, { whole: false, max: this.buf.length }).size;
        } catch (e) {
          return this.fail(e as VtpmError);
        }
      }
      if (this.size !== 0 && this.got === this.size) {
        if (off < d.length) return this.fail(new VtpmError('EPROTO', `${this.description} sent bytes beyond its ${this.size}-byte response`));
        const p = this.pending;
        this.pending = undefined;
        clearTimeout(p.timer);
        p.resolve(this.buf.slice(0, this.size));
        return;
      }
    }
  }

  /** The connection is no longer usable (a response lost in the middle cannot be re-framed). */
  private fail(e: VtpmError): void {
    this.dead ??= e;
    this.sock.destroy();
    const p = this.pending;
    this.pending = undefined;
    if (p) {
      clearTimeout(p.timer);
      p.reject(e);
    }
  }

  async close(): Promise<void> {
    await this.queue.idle();
    this.dead ??= new VtpmError('ECLOSED', `${this.description} is closed`);
    if (this.sock.destroyed) return;
    await new Promise<void>((r) => this.sock.end(() => r()));
    this.sock.destroy();
  }
}
