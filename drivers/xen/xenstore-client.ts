// Xenstore, client side: a domain's view of the hierarchical key/value store the authority
// serves (the tree and its permission rules: xenstore-tree.ts).
//
// API (per domain, reached as `domain.store`; every call is async and fails with a
// typed VtpmError: EPERM, ENOENT, EINVAL, EBUSY for a transaction conflict after retries):
//   read(path) → string            readOpt(path) → string | undefined
//   write(path, value)             mkdir(path)      rm(path) (recursive)
//   list(path) → child names       getPerms(path) / setPerms(path, perms)
//   watch(path, cb) → Promise<unwatch>   cb(changedPath) runs once at registration (as Xen
//                                  does) and on every change at or under path; `@releaseDomain`
//                                  fires when any domain leaves
//   transaction(fn(tx)) → result   optimistic: tx.read/readOpt record what was seen,
//                                  tx.write/mkdir/rm/setPerms are buffered; commit applies all
//                                  writes atomically iff nothing read changed, else retries

import { VtpmError } from '../base/errors.ts';
import type { Perm, TxOp } from './xenstore-tree.ts';

export interface StoreHost {
  request(op: string, args: Record<string, unknown>): Promise<Record<string, unknown>>;
}

export class Transaction {
  readonly ops: TxOp[] = [];
  readonly reads = new Map<string, number>();
  private readonly written = new Map<string, string | null>();
  constructor(private readonly store: XenStore) {}

  async readOpt(path: string): Promise<string | undefined> {
    if (this.written.has(path)) return this.written.get(path) ?? undefined;
    const r = await this.store.host.request('read', { path, opt: true });
    if (!this.reads.has(path)) this.reads.set(path, Number(r.gen));
    return r.value === null || r.value === undefined ? undefined : String(r.value);
  }
  async read(path: string): Promise<string> {
    const v = await this.readOpt(path);
    if (v === undefined) throw new VtpmError('ENOENT', `${path} does not exist`);
    return v;
  }
  write(path: string, value: string): void {
    this.ops.push({ op: 'write', path, value: String(value) });
    this.written.set(path, String(value));
  }
  mkdir(path: string): void {
    this.ops.push({ op: 'mkdir', path });
  }
  rm(path: string): void {
    this.ops.push({ op: 'rm', path });
    this.written.set(path, null);
  }
  setPerms(path: string, perms: Perm[]): void {
    this.ops.push({ op: 'setperms', path, perms });
  }
}

export class XenStore {
  private readonly watches = new Map<string, { path: string; cb: (path: string) => void }>();
  private seq = 0;
  constructor(readonly host: StoreHost) {}

  async readOpt(path: string): Promise<string | undefined> {
    const r = await this.host.request('read', { path, opt: true });
    return r.value === null || r.value === undefined ? undefined : String(r.value);
  }
  async read(path: string): Promise<string> {
    const r = await this.host.request('read', { path });
    return String(r.value);
  }
  async write(path: string, value: string): Promise<void> {
    await this.host.request('write', { path, value: String(value) });
  }
  async mkdir(path: string): Promise<void> {
    await this.host.request('mkdir', { path });
  }
  async rm(path: string): Promise<void> {
    await this.host.request('rm', { path });
  }
  async list(path: string): Promise<string[]> {
    const r = await this.host.request('list', { path });
    return r.names as string[];
  }
  async getPerms(path: string): Promise<Perm[]> {
    const r = await this.host.request('getperms', { path });
    return r.perms as Perm[];
  }
  async setPerms(path: string, perms: Perm[]): Promise<void> {
    await this.host.request('setperms', { path, perms });
  }

  /** Watch `path` and everything under it. Resolves to the unwatch function. */
  async watch(path: string, cb: (changed: string) => void): Promise<() => Promise<void>> {
    const token = `w${++this.seq}`;
    this.watches.set(token, { path, cb });
    try {
      await this.host.request('watch', { path, token });
    } catch (e) {
      this.watches.delete(token);
      throw e;
    }
    return async () => {
      if (!this.watches.delete(token)) return;
      await this.host.request('unwatch', { path, token }).catch(() => {});
    };
  }

  /** Called by the connection for each watch event. */
  dispatch(token: string, path: string): void {
    const w = this.watches.get(token);
    if (!w) return;
    try {
      w.cb(path);
    } catch {
      /* a watch callback's failure is its own business */
    }
  }

  async transaction<T>(fn: (tx: Transaction) => Promise<T>, retries = 16): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const tx = new Transaction(this);
      const result = await fn(tx);
      try {
        await this.host.request('commit', { ops: tx.ops, reads: [...tx.reads].map(([path, gen]) => ({ path, gen })) });
        return result;
      } catch (e) {
        if (!(e instanceof VtpmError && e.code === 'EBUSY' && /conflict/.test(e.message)) || attempt >= retries) throw e;
      }
    }
  }
}
