// The authority's requests, one table: op name → handler. Every handler validates its
// arguments before use and answers a plain record (or throws a VtpmError, sent back as
// {err, msg}). All but ping and hello act as the domain the connection said hello as.
//
//   hello {pid, start, host?, name?} → {domid, mem}
//   map {granter, ref, writable} → {path, offset}      unmap {granter, ref}
//   bind {remoteDom, remotePort, localPort} → {path, record}   (event `bound` {port} to remoteDom)
//   read {path, opt?} → {value, gen}   write {path, value}   mkdir {path}   rm {path}
//   list {path} → {names, gen}   getperms {path} → {perms}   setperms {path, perms}
//   watch {path, token}   unwatch {path, token}   commit {ops, reads}
//   ping → {}   domains → {domids}
import { VtpmError, isVtpmError } from '../base/errors.ts';
import type { Msg } from '../base/frame.ts';
import type { RpcPeer } from '../base/rpc.ts';
import type { Conn, DomainRec, DomainTable } from './authority-domains.ts';
import { acceptBind } from './evtchn-ports.ts';
import { checkAndMap, unmapCount } from './gnttab.ts';
import { GNT_ENTRIES } from './layout.ts';
import { checkPath, checkPerms, type TxOp, type XenstoreTree } from './xenstore-tree.ts';

/** What the handlers act on (the Authority). */
export interface OpContext {
  readonly domains: DomainTable;
  readonly tree: XenstoreTree;
  /** Register (or replace) `peer`'s watch `token` on `path`, and fire it once at once, as in Xen. */
  addWatch(peer: RpcPeer<Conn>, path: string, token: string): void;
  removeWatch(peer: RpcPeer<Conn>, token: string): void;
  /** Push event `ev` to domain `domid`'s connection (if it is connected). */
  domainEvent(domid: number, ev: string, body: Msg): void;
}

type Reply = Record<string, unknown>;
type Op = (c: OpContext, peer: RpcPeer<Conn>, m: Msg) => Reply;

const MAX_WATCHES = 1024;
const MAX_TX_OPS = 256;
const MAX_TX_READS = 1024;

function int(v: unknown, what: string, max = 0x7fffffff): number {
  if (!Number.isInteger(v) || (v as number) < 0 || (v as number) > max) throw new VtpmError('EINVAL', `bad ${what}`);
  return v as number;
}

function value(v: unknown): string {
  if (typeof v !== 'string') throw new VtpmError('EINVAL', 'value must be a string');
  return v;
}

/** A transaction op from the wire, checked field by field. */
function txOp(o: Record<string, unknown>): TxOp {
  if (typeof o !== 'object' || o === null) throw new VtpmError('EINVAL', 'bad transaction op');
  const path = checkPath(o.path);
  switch (o.op) {
    case 'write':
      return { op: 'write', path, value: value(o.value) };
    case 'mkdir':
    case 'rm':
      return { op: o.op, path };
    case 'setperms':
      return { op: 'setperms', path, perms: checkPerms(o.perms) };
    default:
      throw new VtpmError('EINVAL', `unknown transaction op ${String(o.op).slice(0, 40)}`);
  }
}

/** A handler that acts as the connection's domain. */
const asDomain =
  (f: (c: OpContext, d: DomainRec, m: Msg, peer: RpcPeer<Conn>) => Reply): Op =>
  (c, peer, m) =>
    f(c, c.domains.of(peer.state), m, peer);

/** A single xenstore change, as one-op transaction. */
const storeOp = (parse: (m: Msg) => TxOp): Op =>
  asDomain((c, d, m) => {
    c.tree.exec(parse(m), d.domid);
    return {};
  });

const OPS: Record<string, Op> = {
  ping: () => ({}),

  hello: (c, { state: conn }, m) => {
    const pid = int(m.pid, 'pid');
    const start = Number.isInteger(m.start) ? (m.start as number) : 0;
    const name = typeof m.name === 'string' ? m.name : '';
    const d = c.domains.introduce(conn, { pid, start, host: m.host === true, name });
    return { domid: d.domid, mem: d.path };
  },

  map: asDomain((c, d, m) => {
    const granter = int(m.granter, 'granter', 0xffff);
    const ref = int(m.ref, 'ref');
    if (typeof m.writable !== 'boolean') throw new VtpmError('EINVAL', 'bad writable');
    const g = c.domains.get(granter);
    if (!g) throw new VtpmError('ENOENT', `no domain ${granter}`);
    if (ref >= GNT_ENTRIES) throw new VtpmError('EINVAL', `grant ref ${ref} out of range`);
    const offset = checkAndMap(g.table, granter, ref, d.domid, m.writable);
    const key = `${granter}:${ref}`;
    d.held.set(key, (d.held.get(key) ?? 0) + 1);
    // Enforcement boundary: here the path is handed over after the check; with one uid
    // per domain this would be an fd passed with SCM_RIGHTS (see gnttab.ts).
    return { path: g.path, offset };
  }),

  unmap: asDomain((c, d, m) => {
    const granter = int(m.granter, 'granter', 0xffff);
    const ref = int(m.ref, 'ref');
    const key = `${granter}:${ref}`;
    const n = d.held.get(key) ?? 0;
    if (n === 0) throw new VtpmError('ENOENT', `domain ${d.domid} holds no mapping of ${key}`);
    if (n === 1) d.held.delete(key);
    else d.held.set(key, n - 1);
    const g = c.domains.get(granter);
    if (g) unmapCount(g.table, ref);
    return {};
  }),

  bind: asDomain((c, d, m) => {
    const rd = int(m.remoteDom, 'remoteDom', 0xffff);
    const rp = int(m.remotePort, 'remotePort');
    const lp = int(m.localPort, 'localPort');
    const g = c.domains.get(rd);
    if (!g) throw new VtpmError('ENOENT', `no domain ${rd}`);
    acceptBind(g.w, rp, d.domid, lp, d.pid, d.start);
    // the offering domain learns its peer, so it can watch that process itself
    c.domainEvent(rd, 'bound', { port: rp });
    return { path: g.path, record: rp };
  }),

  read: asDomain((c, d, m) => {
    const p = checkPath(m.path);
    try {
      return c.tree.read(p, d.domid);
    } catch (e) {
      if (m.opt === true && isVtpmError(e, 'ENOENT')) return { value: null, gen: -1 };
      throw e;
    }
  }),
  write: storeOp((m) => ({ op: 'write', path: checkPath(m.path), value: value(m.value) })),
  mkdir: storeOp((m) => ({ op: 'mkdir', path: checkPath(m.path) })),
  rm: storeOp((m) => ({ op: 'rm', path: checkPath(m.path) })),
  setperms: storeOp((m) => ({ op: 'setperms', path: checkPath(m.path), perms: checkPerms(m.perms) })),
  list: asDomain((c, d, m) => c.tree.list(checkPath(m.path), d.domid)),
  getperms: asDomain((c, d, m) => ({ perms: c.tree.getPerms(checkPath(m.path), d.domid) })),

  watch: asDomain((c, _d, m, peer) => {
    const p = checkPath(m.path);
    if (typeof m.token !== 'string' || m.token.length > 256) throw new VtpmError('EINVAL', 'bad token');
    if (peer.state.watches.size >= MAX_WATCHES && !peer.state.watches.has(m.token)) throw new VtpmError('EBUSY', 'too many watches');
    c.addWatch(peer, p, m.token);
    return {};
  }),
  unwatch: asDomain((c, _d, m, peer) => {
    if (typeof m.token !== 'string') throw new VtpmError('EINVAL', 'bad token');
    c.removeWatch(peer, m.token);
    return {};
  }),

  commit: asDomain((c, d, m) => {
    if (!Array.isArray(m.ops) || !Array.isArray(m.reads) || m.ops.length > MAX_TX_OPS || m.reads.length > MAX_TX_READS) {
      throw new VtpmError('EINVAL', 'bad transaction');
    }
    const ops = (m.ops as Record<string, unknown>[]).map(txOp);
    const reads = (m.reads as Record<string, unknown>[]).map((r) => ({ path: checkPath(r?.path), gen: Number(r?.gen) }));
    c.tree.commit(ops, reads, d.domid);
    return {};
  }),

  domains: asDomain((c) => ({ domids: c.domains.ids() })),
};

/** Run one request from `peer`. */
export function handleRequest(c: OpContext, peer: RpcPeer<Conn>, m: Msg): Reply {
  const op = m.op;
  if (typeof op !== 'string') throw new VtpmError('EINVAL', 'missing op');
  const f = Object.hasOwn(OPS, op) ? OPS[op] : undefined;
  if (!f) throw new VtpmError('EINVAL', `unknown op ${op.slice(0, 40)}`);
  return f(c, peer, m);
}
