// Request/reply over a unix stream socket in CBOR frames (frame.ts): what the authority
// and the manager's control API speak. Requests {v, id, op, ...args}; replies
// {v, id, ok: true, ...result} or {v, id, err: code, msg, cause?: WireError}; unsolicited
// events {v, ev, ...}. A frame the server cannot read gets an error reply with id null
// (and the connection is closed when the stream cannot be resynchronised); a handler that
// throws answers its own request only: the server and its other clients go on.
import fs from 'node:fs';
import net from 'node:net';
import { errorFromWire, errorToWire, VtpmError, type WireError } from './errors.ts';
import { encodeFrame, FrameReader, PROTO_VERSION, type Msg } from './frame.ts';

/** One client connection as the server sees it; `state` is the server's per-connection data. */
export interface RpcPeer<S> {
  readonly sock: net.Socket;
  state: S;
  /** Push an unsolicited event to this client. */
  event(ev: string, body?: Msg): void;
}

export interface RpcServerOptions<S> {
  /** Socket path, mode 0600. A stale socket file there (nobody accepts on it) is replaced;
   *  a live one is refused with EBUSY, never taken over. */
  path: string;
  /** Who serves it, for that refusal ("an authority", "a manager"). */
  what: string;
  /** Per-connection state for a new client. */
  accept(sock: net.Socket): S;
  /** Run one request; the result's fields go into the reply. Throw VtpmError to refuse it. */
  handle(msg: Msg, peer: RpcPeer<S>): Msg | void | Promise<Msg | void>;
  /** A client went away. */
  closed?(peer: RpcPeer<S>): void;
  /** Error replies as {v, id, err, msg} only, without the cause chain (the authority's wire). */
  plainErrors?: boolean;
  /** false: a request whose op is not a string still goes to `handle` (which refuses it in
   *  its own words); default: the server answers EPROTO. */
  requireOp?: boolean;
}

export class RpcServer<S> {
  private readonly peers = new Set<RpcPeer<S>>();
  private constructor(
    private readonly server: net.Server,
    readonly path: string,
  ) {}

  static async listen<S>(o: RpcServerOptions<S>): Promise<RpcServer<S>> {
    if (fs.existsSync(o.path) && (await accepting(o.path))) throw new VtpmError('EBUSY', `${o.what} already serves ${o.path}`);
    fs.rmSync(o.path, { force: true });
    let self!: RpcServer<S>;
    const server = net.createServer((sock) => self.accept(sock, o));
    self = new RpcServer<S>(server, o.path);
    // Create the socket 0600 from the start: no window in which others could connect.
    const mask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(o.path, () => resolve());
      });
    } finally {
      process.umask(mask);
    }
    fs.chmodSync(o.path, 0o600);
    return self;
  }

  get clients(): Iterable<RpcPeer<S>> {
    return this.peers;
  }

  private accept(sock: net.Socket, o: RpcServerOptions<S>): void {
    const send = (m: Msg) => {
      if (sock.destroyed || !sock.writable) return;
      try {
        sock.write(encodeFrame(m));
      } catch (e) {
        // A reply too large for a frame: say so instead of leaving the client waiting.
        sock.write(encodeFrame({ v: PROTO_VERSION, id: m.id ?? null, err: 'EOVERSIZE', msg: (e as Error).message }));
      }
    };
    const peer: RpcPeer<S> = { sock, state: o.accept(sock), event: (ev, body = {}) => send({ v: PROTO_VERSION, ev, ...body }) };
    this.peers.add(peer);
    const reader = new FrameReader();
    const fail = (id: unknown, e: unknown) => {
      const w = errorToWire(e);
      send({ v: PROTO_VERSION, id, err: w.code, msg: w.message, ...(w.cause && !o.plainErrors ? { cause: w.cause } : {}) });
    };
    sock.on('data', (chunk: Buffer) => {
      for (const r of reader.push(chunk)) {
        if ('error' in r) {
          fail(null, r.error);
          if (r.fatal) sock.end();
          continue;
        }
        const id = r.msg.id;
        if (typeof r.msg.op !== 'string' && o.requireOp !== false) {
          fail(id ?? null, new VtpmError('EPROTO', 'request without an op'));
          continue;
        }
        try {
          const out = o.handle(r.msg, peer);
          if (out instanceof Promise) out.then((res) => send({ v: PROTO_VERSION, id, ok: true, ...res }), (e) => fail(id, e));
          else send({ v: PROTO_VERSION, id, ok: true, ...out });
        } catch (e) {
          fail(id, e);
        }
      }
    });
    sock.on('error', () => {}); // a client that vanished: 'close' follows
    sock.on('close', () => {
      this.peers.delete(peer);
      o.closed?.(peer);
    });
  }

  close(): void {
    this.server.close();
    for (const p of this.peers) p.sock.destroy();
    fs.rmSync(this.path, { force: true });
  }
}

/** Whether something accepts connections on the unix socket at `path`. */
export function accepting(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** A client connection: requests with replies matched by id, events to a callback. */
export class RpcClient {
  private readonly pending = new Map<number, { resolve: (m: Msg) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private lost: VtpmError | null = null;
  private readonly lostCbs: ((e: VtpmError) => void)[] = [];

  private constructor(
    private readonly sock: net.Socket,
    readonly what: string,
  ) {}

  /** Connect to `path`; `what` names the server in errors ("the authority at DIR"). */
  static connect(path: string, what: string, onEvent?: (m: Msg) => void): Promise<RpcClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(path);
      const c = new RpcClient(sock, what);
      const reader = new FrameReader();
      sock.once('connect', () => resolve(c));
      sock.on('error', (e) => reject(new VtpmError('ENOENT', `cannot reach ${what}: ${e.message}`, { cause: e })));
      sock.on('data', (chunk: Buffer) => {
        for (const r of reader.push(chunk)) {
          if ('error' in r) continue; // a garbled reply: its request times out at the caller
          if (typeof r.msg.ev === 'string') {
            onEvent?.(r.msg);
            continue;
          }
          c.settle(r.msg);
        }
      });
      sock.on('close', () => c.closed());
    });
  }

  private settle(m: Msg): void {
    const p = this.pending.get(Number(m.id));
    if (!p) return;
    this.pending.delete(Number(m.id));
    if (m.ok === true) return p.resolve(m);
    const w: WireError = { code: typeof m.err === 'string' ? m.err : 'EPROTO', message: typeof m.msg === 'string' ? m.msg : `${this.what} refused the request` };
    if (m.cause && typeof m.cause === 'object') w.cause = m.cause as WireError;
    p.reject(errorFromWire(w));
  }

  private closed(): void {
    this.lost ??= new VtpmError('ECLOSED', `connection to ${this.what} closed`);
    for (const p of this.pending.values()) p.reject(this.lost);
    this.pending.clear();
    for (const cb of this.lostCbs.splice(0)) cb(this.lost);
  }

  request(op: string, args: Msg = {}, timeoutMs = 0): Promise<Msg> {
    if (this.lost) return Promise.reject(this.lost);
    const id = this.nextId++;
    return new Promise<Msg>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new VtpmError('ETIMEDOUT', `${this.what} did not answer ${op} within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      const done = <T>(f: (v: T) => void) => (v: T) => {
        clearTimeout(timer);
        f(v);
      };
      this.pending.set(id, { resolve: done(resolve), reject: done(reject) });
      try {
        this.sock.write(encodeFrame({ v: PROTO_VERSION, id, op, ...args }));
      } catch (e) {
        this.pending.delete(id);
        clearTimeout(timer);
        reject(e);
      }
    });
  }

  onLost(cb: (e: VtpmError) => void): void {
    if (this.lost) cb(this.lost);
    else this.lostCbs.push(cb);
  }

  get isLost(): boolean {
    return this.lost !== null;
  }

  /** Drop the connection at once (pending requests fail with ECLOSED). */
  destroy(): void {
    this.sock.destroy();
  }

  /** Close our end; resolves once the connection is gone. */
  end(): Promise<void> {
    if (this.lost) return Promise.resolve();
    return new Promise((r) => {
      this.onLost(() => r());
      this.sock.end();
    });
  }
}

/** One request on a fresh connection (what the CLI does). */
export async function rpcOnce(path: string, what: string, op: string, args: Msg = {}, timeoutMs = 30_000): Promise<Msg> {
  const c = await RpcClient.connect(path, what);
  try {
    return await c.request(op, args, timeoutMs);
  } finally {
    await c.end();
  }
}
