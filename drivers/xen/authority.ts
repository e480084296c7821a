// The authority: the hypervisor's bookkeeping role for one host runtime directory.
//
//   tsx drivers/xen/authority.ts --dir DIR [--parent PID]   (--parent: exit when PID dies,
//                                                           watched with a pidfd)
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
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VtpmError, isVtpmError } from '../base/errors.ts';
import { accepting, RpcServer, type RpcPeer } from '../base/rpc.ts';
import { socketPath } from './layout.ts';
import type { Msg } from '../base/frame.ts';
import { procStartTime } from '../base/libc.ts';
import { peerWatch } from './evtchn-watch.ts';
import { XenstoreTree, type Perm } from './xenstore-tree.ts';
import { DomainTable, type Conn } from './authority-domains.ts';
import { handleRequest, type OpContext } from './authority-ops.ts';
import { WatchIndex } from './authority-watches.ts';

export class Authority implements OpContext {
  readonly tree = new XenstoreTree();
  readonly domains: DomainTable;
  private server: RpcServer<Conn> | null = null;
  private readonly watches = new WatchIndex<RpcPeer<Conn>>();

  constructor(readonly dir: string) {
    this.tree.onChange = (p, perms) => this.fire(p, perms);
    this.domains = new DomainTable(dir, this.tree, (p) => this.fire(p, null));
  }

  async listen(): Promise<void> {
    const sp = socketPath(this.dir);
    // Before anything is touched: a live authority's memory files must not be wiped.
    if (await accepting(sp)) throw new VtpmError('EBUSY', `an authority already serves ${this.dir}`);
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    fs.chmodSync(this.dir, 0o700);
    fs.mkdirSync(path.join(this.dir, 'mem'), { recursive: true, mode: 0o700 });
    for (const f of fs.readdirSync(path.join(this.dir, 'mem'))) fs.rmSync(path.join(this.dir, 'mem', f), { force: true });
    this.tree.apply({ op: 'mkdir', path: '/local/domain' }, 0);
    this.server = await RpcServer.listen<Conn>({
      path: sp,
      what: 'an authority',
      accept: () => ({ domid: null, watches: new Map() }),
      handle: (m, peer) => {
        try {
          return handleRequest(this, peer, m);
        } catch (e) {
          throw isVtpmError(e) ? e : new VtpmError('EINVAL', (e as Error).message ?? String(e), { cause: e });
        }
      },
      closed: (peer) => {
        for (const token of [...peer.state.watches.keys()]) this.removeWatch(peer, token);
        this.domains.dropped(peer.state);
      },
      plainErrors: true,
      requireOp: false,
    });
  }

  close(): void {
    this.server?.close();
    this.domains.reapAll();
  }

  domainEvent(domid: number, ev: string, body: Msg): void {
    for (const peer of this.server?.clients ?? []) if (peer.state.domid === domid) peer.event(ev, body);
  }

  addWatch(peer: RpcPeer<Conn>, p: string, token: string): void {
    this.removeWatch(peer, token);
    peer.state.watches.set(token, p);
    this.watches.add(peer, p, token);
    setImmediate(() => peer.event('watch', { path: p, token }));
  }

  removeWatch(peer: RpcPeer<Conn>, token: string): void {
    const p = peer.state.watches.get(token);
    if (p === undefined) return;
    peer.state.watches.delete(token);
    this.watches.remove(peer, p, token);
  }

  /** A change at `p` (perms: who may read it; null for the special @ paths). */
  private fire(p: string, perms: Perm[] | null): void {
    this.watches.forChange(p, (peer, tokens) => {
      const c = peer.state;
      if (c.domid === null || (perms && !XenstoreTree.canRead(perms, c.domid))) return;
      for (const token of tokens) peer.event('watch', { path: p, token });
    });
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
  // --parent: its exit is a readable pidfd (no timer); a parent already gone stops us at once
  if (parent > 0) peerWatch.watch(parent, procStartTime(parent), stop);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) void main();
