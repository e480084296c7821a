// The authority: the hypervisor's bookkeeping role for one host runtime directory.
//
//   tsx drivers/xen/authority.ts --dir DIR [--parent PID]   (--parent: exit when PID dies)
//
// DIR is created mode 0700; the unix socket is DIR/authority.sock; each domain's shared
// memory file is DIR/mem/dom<id> (0600, created here, unlinked when the domain leaves).
// One connection = one domain: the first request must be `hello`, which assigns the domid
// (0 only to the first `host: true` caller); every later request on that connection acts
// as that domid, so no process can claim another's. When the connection drops the domain
// is dead and reaped (authority-domains.ts).
//
// Wire: drivers/base/frame.ts (u32 BE length + CBOR map with v = 1, bodies ≤ 64 KiB).
// Requests are {id, op, ...args} (the ops: authority-ops.ts); replies {id, ok: true, ...}.
// Errors come back as {err: VtpmErrorCode, msg}; a malformed frame gets an EPROTO reply
// and the connection keeps going; an oversized frame gets EOVERSIZE and that connection
// is closed (the stream cannot be resynchronised); other connections are unaffected.
//
// Library helpers (authority-launch.ts): startAuthority(dir) spawns it (tied to its parent,
// or detached) and waits until it answers; authorityRunning(dir) tells whether one answers
// for DIR; Domain.join(dir) (domain.ts) connects to a running one.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VtpmError, isVtpmError } from '../base/errors.ts';
import { FrameReader, PROTO_VERSION, encodeFrame, type Msg } from '../base/frame.ts';
import { socketPath } from './layout.ts';
import { XenstoreTree, type Perm } from './xenstore-tree.ts';
import { DomainTable, type Conn } from './authority-domains.ts';
import { handleRequest, type OpContext } from './authority-ops.ts';
import { authorityRunning } from './authority-launch.ts';

export class Authority implements OpContext {
  private readonly conns = new Set<Conn>();
  readonly tree = new XenstoreTree();
  readonly domains: DomainTable;
  private server: net.Server | null = null;

  constructor(readonly dir: string) {
    this.tree.onChange = (p, perms) => this.fire(p, perms);
    this.domains = new DomainTable(dir, this.tree, (p) => this.fire(p, null));
  }

  async listen(): Promise<void> {
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    fs.chmodSync(this.dir, 0o700);
    fs.mkdirSync(path.join(this.dir, 'mem'), { recursive: true, mode: 0o700 });
    for (const f of fs.readdirSync(path.join(this.dir, 'mem'))) fs.rmSync(path.join(this.dir, 'mem', f), { force: true });
    const sp = socketPath(this.dir);
    if (fs.existsSync(sp)) {
      if (await authorityRunning(this.dir)) throw new VtpmError('EBUSY', `an authority already serves ${this.dir}`);
      fs.rmSync(sp, { force: true });
    }
    this.tree.apply({ op: 'mkdir', path: '/local/domain' }, 0);
    this.server = net.createServer((s) => this.accept(s));
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(sp, () => resolve());
    });
    fs.chmodSync(sp, 0o600);
  }

  close(): void {
    this.server?.close();
    for (const c of this.conns) c.sock.destroy();
    this.domains.reapAll();
    fs.rmSync(socketPath(this.dir), { force: true });
  }

  private accept(sock: net.Socket): void {
    const conn: Conn = { sock, domid: null, watches: new Map() };
    this.conns.add(conn);
    const reader = new FrameReader();
    sock.on('data', (chunk) => {
      for (const r of reader.push(chunk)) {
        if ('error' in r) {
          this.send(conn, { v: PROTO_VERSION, id: null, err: r.error.code, msg: r.error.message });
          if (r.fatal) sock.end();
          continue;
        }
        const id = r.msg.id;
        try {
          const result = handleRequest(this, conn, r.msg);
          this.send(conn, { v: PROTO_VERSION, id, ok: true, ...result });
        } catch (e) {
          const err = isVtpmError(e) ? e : new VtpmError('EINVAL', (e as Error).message ?? String(e), { cause: e });
          this.send(conn, { v: PROTO_VERSION, id, err: err.code, msg: err.message });
        }
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      this.conns.delete(conn);
      this.domains.dropped(conn);
    });
  }

  private send(conn: Conn, m: Msg): void {
    if (conn.sock.destroyed || !conn.sock.writable) return;
    try {
      conn.sock.write(encodeFrame(m));
    } catch {
      /* oversized replies cannot happen for well-formed requests */
    }
  }

  watchEvent(conn: Conn, p: string, token: string): void {
    setImmediate(() => this.send(conn, { v: PROTO_VERSION, ev: 'watch', path: p, token }));
  }

  /** A change at `p` (perms: who may read it; null for the special @ paths). */
  private fire(p: string, perms: Perm[] | null): void {
    for (const c of this.conns) {
      if (c.domid === null) continue;
      for (const [token, wp] of c.watches) {
        const hit = p.startsWith('@') ? wp === p : wp === '/' || p === wp || p.startsWith(wp + '/');
        if (!hit) continue;
        if (perms && !XenstoreTree.canRead(perms, c.domid)) continue;
        this.send(c, { v: PROTO_VERSION, ev: 'watch', path: p, token });
      }
    }
  }
}

/** With --parent: true once that process is gone (we were reparented, or it cannot be signalled). */
function parentGone(parent: number): boolean {
  try {
    const st = fs.readFileSync('/proc/self/stat', 'latin1');
    if (Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]) !== parent) return true; // process.ppid is cached
  } catch {
    /* no /proc: rely on kill(0) */
  }
  try {
    process.kill(parent, 0);
    return false;
  } catch {
    return true;
  }
}

async function main(): Promise<void> {
  const i = process.argv.indexOf('--dir');
  const dir = i > 0 ? process.argv[i + 1] : undefined;
  if (!dir) {
    process.stderr.write('usage: authority.ts --dir DIR [--parent PID]\n');
    process.exit(2);
  }
  const a = new Authority(path.resolve(dir));
  try {
    await a.listen();
  } catch (e) {
    process.stderr.write(`authority: ${(e as Error).message}\n`);
    process.exit(1);
  }
  const stop = (): void => {
    a.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const pi = process.argv.indexOf('--parent');
  const parent = pi > 0 ? Number(process.argv[pi + 1]) : 0;
  if (parent > 0) setInterval(() => parentGone(parent) && stop(), 1000).unref();
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) void main();
