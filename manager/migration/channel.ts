// One migration connection between two managers: length-limited CBOR frames
// (drivers/base/frame.ts) over TCP, read one message at a time with a deadline. Any frame
// error ends the connection (a migration never resynchronises a stream).
import * as net from 'node:net';
import { VtpmError } from '../../drivers/base/errors.ts';
import { encodeFrame, FrameReader, PROTO_VERSION, type Msg } from '../../drivers/base/frame.ts';

export const MIGRATION_PROTOCOL = 1;
/** Bytes of ciphertext per chunk frame (frames are at most 64 KiB). */
export const CHUNK = 48 * 1024;

export interface Address {
  host: string;
  port: number;
}

export function parseAddress(s: string): Address {
  const m = /^(\[[0-9a-fA-F:]+\]|[0-9.]+|[a-zA-Z0-9.-]+):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535) throw new VtpmError('EINVAL', `address ${JSON.stringify(s.slice(0, 80))}: use HOST:PORT (e.g. 10.0.0.2:7711)`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}

export class Channel {
  private readonly reader = new FrameReader();
  private readonly queue: Msg[] = [];
  private waiter: ((m: Msg | VtpmError) => void) | null = null;
  private failure: VtpmError | null = null;
  private draining = false;

  constructor(
    private readonly sock: net.Socket,
    readonly peer: string,
  ) {
    sock.setNoDelay(true);
    sock.on('data', (chunk: Buffer) => {
      if (this.draining) return;
      for (const r of this.reader.push(chunk)) {
        if ('error' in r) return this.fail(new VtpmError('EPROTO', `${peer} sent a bad frame: ${r.error.message}`, { cause: r.error }));
        if (r.msg.m !== MIGRATION_PROTOCOL) return this.fail(new VtpmError('EPROTO', `${peer} speaks migration protocol ${String(r.msg.m)} (this host: ${MIGRATION_PROTOCOL})`));
        this.deliver(r.msg);
      }
    });
    sock.on('error', (e) => this.fail(new VtpmError('ECLOSED', `connection to ${peer} failed: ${e.message}`, { cause: e })));
    sock.on('close', () => this.fail(new VtpmError('ECLOSED', `${peer} closed the connection`)));
  }

  static connect(a: Address, timeoutMs: number): Promise<Channel> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: a.host, port: a.port });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new VtpmError('ETIMEDOUT', `no answer from ${a.host}:${a.port} within ${timeoutMs} ms`));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(timer);
        resolve(new Channel(sock, `${a.host}:${a.port}`));
      });
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(new VtpmError('ECLOSED', `cannot reach the manager at ${a.host}:${a.port}: ${e.message}`, { cause: e }));
      });
    });
  }

  get isClosed(): boolean {
    return this.failure !== null;
  }

  send(type: string, body: Msg = {}): void {
    if (this.failure) throw this.failure;
    this.sock.write(encodeFrame({ v: PROTO_VERSION, m: MIGRATION_PROTOCOL, t: type, ...body }));
  }

  /** The next message, which must be of type `type` (or one of them); an `abort` from the
   *  peer is its error. */
  async next(type: string | string[], timeoutMs: number): Promise<Msg> {
    const types = typeof type === 'string' ? [type] : type;
    const m = await this.take(timeoutMs, types.join(' or '));
    if (m.t === 'abort') {
      const msg = typeof m.msg === 'string' ? m.msg.slice(0, 500) : 'no reason given';
      throw new VtpmError('EPERM', `${this.peer} refused: ${msg}`);
    }
    if (!types.includes(m.t as string)) throw this.fail(new VtpmError('EPROTO', `${this.peer} sent ${JSON.stringify(String(m.t).slice(0, 20))} where ${types.join(' or ')} was due`));
    return m;
  }

  close(): void {
    this.sock.end();
    this.sock.destroySoon();
  }

  /** After our last word (an abort): half-close, and read and drop what the peer still
   *  sends until it closes (at most `ms`). Closing outright would answer its frames in
   *  flight with a reset, and a reset makes the peer's kernel drop our abort unread. */
  linger(ms: number): void {
    this.draining = true;
    this.sock.end();
    setTimeout(() => this.sock.destroy(), ms).unref();
  }

  destroy(): void {
    this.sock.destroy();
  }

  private take(timeoutMs: number, what: string): Promise<Msg> {
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(this.fail(new VtpmError('ETIMEDOUT', `${this.peer} sent no ${what} within ${timeoutMs} ms`)));
      }, timeoutMs);
      this.waiter = (r) => {
        clearTimeout(timer);
        this.waiter = null;
        if (r instanceof VtpmError) reject(r);
        else resolve(r);
      };
    });
  }

  private deliver(m: Msg): void {
    if (this.waiter) this.waiter(m);
    else this.queue.push(m);
    // Bounded: a peer that floods us is cut off (one migration never has more in flight).
    if (this.queue.length > 256) this.fail(new VtpmError('EOVERSIZE', `${this.peer} sent more than 256 unread messages`));
  }

  private fail(e: VtpmError): VtpmError {
    if (!this.failure) {
      this.failure = e;
      this.sock.destroy();
      this.waiter?.(e);
    }
    return this.failure;
  }
}
