// The authority: the hypervisor's bookkeeping role for one host runtime directory.
//
//   tsx drivers/xen/authority.ts --dir DIR [--parent PID]   (--parent: exit when PID dies)
//
// DIR is created mode 0700; the unix socket is DIR/authority.sock; each domain's shared
// memory file is DIR/mem/dom<id> (0600, created here, unlinked when the domain leaves).
// One connection = one domain: the first request must be `hello`, which assigns the domid
// (0 only to the first `host: true` caller); every later request on that connection acts
// as that domid, so no process can claim another's. When the connection drops the domain
// is dead: its xenstore subtree is removed, its event channels (and every channel bound to
// them) are closed with the waiters woken, the mappings it held are released, its memory
// file is unlinked, and `@releaseDomain` watches fire.
//
// Wire: frame.ts (u32 BE length + CBOR map with v = 1, bodies ≤ 64 KiB). Ops:
//   hello {pid, start, host?, name?} → {domid, mem}
//   map {granter, ref, writable} → {path, offset}      unmap {granter, ref}
//   bind {remoteDom, remotePort, localPort} → {path, record}
//   read {path, opt?} → {value, gen}   write {path, value}   mkdir {path}   rm {path}
//   list {path} → {names, gen}   getperms {path} → {perms}   setperms {path, perms}
//   watch {path, token}   unwatch {path, token}   commit {ops, reads}
//   ping → {}   domains → {domids}
// Errors come back as {err: VtpmErrorCode, msg}; a malformed frame gets an EPROTO reply
// and the connection keeps going; an oversized frame gets EOVERSIZE and that connection
// is closed (the stream cannot be resynchronised); other connections are unaffected.
//
// Library helpers (authority-launch.ts): startAuthority(dir) spawns it as a child process
// and waits until it answers; authorityRunning(dir) tells whether one answers for DIR;
// Domain.join(dir) (domain.ts) connects to a running one.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VtpmError, isVtpmError } from '../base/errors.ts';
import { FrameReader, PROTO_VERSION, encodeFrame, type Msg } from '../base/frame.ts';
import { FILE_BYTES, GNT_ENTRIES, GNT_START, HDR_DOMID, HDR_MAGIC, HDR_PID, HDR_START, HDR_VERSION, LAYOUT_VERSION, MAGIC, PAGE, memPath, socketPath } from './layout.ts';
import { mapFile, type Mapping } from '../base/libc.ts';
import { XenstoreTree, checkPath, checkPerms, type TxOp } from './xenstore.ts';
import { checkAndMap, unmapCount } from './gnttab.ts';
import { acceptBind, closeChannelsOf } from './evtchn-ports.ts';
import { authorityRunning } from './authority-launch.ts';

const OPS = new Set(['ping', 'hello', 'map', 'unmap', 'bind', 'read', 'write', 'mkdir', 'rm', 'list', 'getperms', 'setperms', 'watch', 'unwatch', 'commit', 'domains']);

interface DomainRec {
  domid: number;
  pid: number;
  start: number;
  name: string;
  path: string;
  mem: Mapping;
  w: Int32Array;
  table: Int32Array;
  held: Map<string, number>; // "granter:ref" → count of mappings this domain holds
  conn: Conn;
}

interface Conn {
  sock: net.Socket;
  domid: number | null;
  watches: Map<string, string>; // token → path
}

export class Authority {
  private readonly domains = new Map<number, DomainRec>();
  private readonly conns = new Set<Conn>();
  private readonly tree = new XenstoreTree();
  private nextDomid = 1;
  private server: net.Server | null = null;

  constructor(readonly dir: string) {
    this.tree.onChange = (p, perms) => this.fire(p, perms);
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
    for (const d of [...this.domains.values()]) this.reap(d);
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
          const result = this.handle(conn, r.msg);
          this.send(conn, { v: PROTO_VERSION, id, ok: true, ...result });
        } catch (e) {
          const err = isVtpmError(e) ? e : new VtpmError('EINVAL', (e as Error).message ?? String(e));
          this.send(conn, { v: PROTO_VERSION, id, err: err.code, msg: err.message });
        }
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => {
      this.conns.delete(conn);
      if (conn.domid !== null) {
        const d = this.domains.get(conn.domid);
        if (d && d.conn === conn) this.reap(d);
      }
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

  private fire(p: string, perms: import('./xenstore.ts').Perm[] | null): void {
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

  private dom(conn: Conn): DomainRec {
    if (conn.domid === null) throw new VtpmError('EPERM', 'say hello first');
    return this.domains.get(conn.domid)!;
  }

  private int(v: unknown, what: string, max = 0x7fffffff): number {
    if (!Number.isInteger(v) || (v as number) < 0 || (v as number) > max) throw new VtpmError('EINVAL', `bad ${what}`);
    return v as number;
  }

  private handle(conn: Conn, m: Msg): Record<string, unknown> {
    const op = m.op;
    if (typeof op !== 'string') throw new VtpmError('EINVAL', 'missing op');
    if (!OPS.has(op)) throw new VtpmError('EINVAL', `unknown op ${op.slice(0, 40)}`);
    if (op === 'ping') return {};
    if (op === 'hello') return this.hello(conn, m);
    const d = this.dom(conn);
    switch (op) {
      case 'map': {
        const granter = this.int(m.granter, 'granter', 0xffff);
        const ref = this.int(m.ref, 'ref');
        if (typeof m.writable !== 'boolean') throw new VtpmError('EINVAL', 'bad writable');
        const g = this.domains.get(granter);
        if (!g) throw new VtpmError('ENOENT', `no domain ${granter}`);
        if (ref >= GNT_ENTRIES) throw new VtpmError('EINVAL', `grant ref ${ref} out of range`);
        const offset = checkAndMap(g.table, granter, ref, d.domid, m.writable);
        const key = `${granter}:${ref}`;
        d.held.set(key, (d.held.get(key) ?? 0) + 1);
        // Enforcement boundary: here the path is handed over after the check; with one uid
        // per domain this would be an fd passed with SCM_RIGHTS (see gnttab.ts).
        return { path: g.path, offset };
      }
      case 'unmap': {
        const granter = this.int(m.granter, 'granter', 0xffff);
        const ref = this.int(m.ref, 'ref');
        const key = `${granter}:${ref}`;
        const n = d.held.get(key) ?? 0;
        if (n === 0) throw new VtpmError('ENOENT', `domain ${d.domid} holds no mapping of ${key}`);
        if (n === 1) d.held.delete(key);
        else d.held.set(key, n - 1);
        const g = this.domains.get(granter);
        if (g) unmapCount(g.table, ref);
        return {};
      }
      case 'bind': {
        const rd = this.int(m.remoteDom, 'remoteDom', 0xffff);
        const rp = this.int(m.remotePort, 'remotePort');
        const lp = this.int(m.localPort, 'localPort');
        const g = this.domains.get(rd);
        if (!g) throw new VtpmError('ENOENT', `no domain ${rd}`);
        acceptBind(g.w, rp, d.domid, lp, d.pid, d.start);
        return { path: g.path, record: rp };
      }
      case 'read': {
        const p = checkPath(m.path);
        if (m.opt === true) {
          try {
            return this.tree.read(p, d.domid);
          } catch (e) {
            if (isVtpmError(e, 'ENOENT')) return { value: null, gen: -1 };
            throw e;
          }
        }
        return this.tree.read(p, d.domid);
      }
      case 'write':
        if (typeof m.value !== 'string') throw new VtpmError('EINVAL', 'value must be a string');
        this.tree.exec({ op: 'write', path: checkPath(m.path), value: m.value }, d.domid);
        return {};
      case 'mkdir':
        this.tree.exec({ op: 'mkdir', path: checkPath(m.path) }, d.domid);
        return {};
      case 'rm':
        this.tree.exec({ op: 'rm', path: checkPath(m.path) }, d.domid);
        return {};
      case 'list':
        return this.tree.list(checkPath(m.path), d.domid);
      case 'getperms':
        return { perms: this.tree.getPerms(checkPath(m.path), d.domid) };
      case 'setperms':
        this.tree.exec({ op: 'setperms', path: checkPath(m.path), perms: checkPerms(m.perms) }, d.domid);
        return {};
      case 'watch': {
        const p = checkPath(m.path);
        if (typeof m.token !== 'string' || m.token.length > 256) throw new VtpmError('EINVAL', 'bad token');
        if (conn.watches.size >= 1024) throw new VtpmError('EBUSY', 'too many watches');
        conn.watches.set(m.token, p);
        // like Xen, a new watch fires once at once
        setImmediate(() => this.send(conn, { v: PROTO_VERSION, ev: 'watch', path: p, token: m.token }));
        return {};
      }
      case 'unwatch':
        if (typeof m.token !== 'string') throw new VtpmError('EINVAL', 'bad token');
        conn.watches.delete(m.token);
        return {};
      case 'commit': {
        if (!Array.isArray(m.ops) || !Array.isArray(m.reads) || m.ops.length > 256 || m.reads.length > 1024) throw new VtpmError('EINVAL', 'bad transaction');
        const ops = (m.ops as Record<string, unknown>[]).map((o): TxOp => {
          if (typeof o !== 'object' || o === null) throw new VtpmError('EINVAL', 'bad transaction op');
          const p = checkPath(o.path);
          switch (o.op) {
            case 'write':
              if (typeof o.value !== 'string') throw new VtpmError('EINVAL', 'value must be a string');
              return { op: 'write', path: p, value: o.value };
            case 'mkdir':
              return { op: 'mkdir', path: p };
            case 'rm':
              return { op: 'rm', path: p };
            case 'setperms':
              return { op: 'setperms', path: p, perms: checkPerms(o.perms) };
            default:
              throw new VtpmError('EINVAL', `unknown transaction op ${String(o.op)}`);
          }
        });
        const reads = (m.reads as Record<string, unknown>[]).map((r) => ({ path: checkPath(r?.path), gen: Number(r?.gen) }));
        this.tree.commit(ops, reads, d.domid);
        return {};
      }
      case 'domains':
        return { domids: [...this.domains.keys()] };
      default:
        throw new VtpmError('EINVAL', `unknown op ${op}`);
    }
  }

  private hello(conn: Conn, m: Msg): Record<string, unknown> {
    if (conn.domid !== null) throw new VtpmError('EBUSY', `this connection already is domain ${conn.domid}`);
    const pid = this.int(m.pid, 'pid');
    const start = Number.isInteger(m.start) ? (m.start as number) : 0;
    let domid: number;
    if (m.host === true) {
      if (this.domains.has(0)) throw new VtpmError('EBUSY', 'domain 0 is taken');
      domid = 0;
    } else {
      while (this.domains.has(this.nextDomid)) this.nextDomid++;
      if (this.nextDomid > 0x7fef) throw new VtpmError('EBUSY', 'no free domid');
      domid = this.nextDomid++;
    }
    const p = memPath(this.dir, domid);
    fs.rmSync(p, { force: true });
    const fd = fs.openSync(p, 'wx+', 0o600);
    fs.ftruncateSync(fd, FILE_BYTES);
    fs.closeSync(fd);
    const mem = mapFile(p, 0, FILE_BYTES, true);
    const w = new Int32Array(mem.buffer);
    w[HDR_MAGIC] = MAGIC;
    w[HDR_VERSION] = LAYOUT_VERSION;
    w[HDR_DOMID] = domid;
    w[HDR_PID] = pid;
    w[HDR_START] = start;
    const rec: DomainRec = {
      domid, pid, start, name: typeof m.name === 'string' ? m.name.slice(0, 64) : '', path: p, mem, w,
      table: new Int32Array(mem.buffer, GNT_START * PAGE, GNT_ENTRIES * 2), held: new Map(), conn,
    };
    this.domains.set(domid, rec);
    conn.domid = domid;
    if (domid !== 0) this.tree.introduce(domid);
    else this.tree.apply({ op: 'mkdir', path: '/local/domain/0' }, 0);
    this.fire('@introduceDomain', null);
    return { domid, mem: p };
  }

  private reap(d: DomainRec): void {
    this.domains.delete(d.domid);
    for (const [key, n] of d.held) {
      const [g, ref] = key.split(':').map(Number) as [number, number];
      const gd = this.domains.get(g);
      if (gd) for (let i = 0; i < n; i++) unmapCount(gd.table, ref);
    }
    closeChannelsOf(d.w, d.mem.addr, d.domid, true);
    for (const o of this.domains.values()) closeChannelsOf(o.w, o.mem.addr, d.domid, false);
    this.tree.release(d.domid);
    d.mem.unmap();
    fs.rmSync(d.path, { force: true });
    this.fire('@releaseDomain', null);
  }
}

async function main(): Promise<void> {
  const i = process.argv.indexOf('--dir');
  const dir = i > 0 ? process.argv[i + 1] : undefined;
  if (!dir) {
    process.stderr.write('usage: authority.ts --dir DIR\n');
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
  if (parent > 0) {
    setInterval(() => {
      // the process that started us is gone once we were reparented (or it cannot be signalled)
      let gone = false;
      try {
        const st = fs.readFileSync('/proc/self/stat', 'latin1');
        gone = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]) !== parent; // process.ppid is cached
      } catch {
        /* no /proc: rely on kill(0) */
      }
      try {
        process.kill(parent, 0);
      } catch {
        gone = true;
      }
      if (gone) stop();
    }, 1000).unref();
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) void main();
