// Xenstore, server side: the tree the authority keeps (authority.ts), its permission
// checks, atomic transaction commit and change notification. Clients reach it through the
// authority's socket (xenstore-client.ts).
//
// Permissions follow Xen: perms[0] = {dom: owner, perm: default for everyone not listed};
// owner and domain 0 may do anything; 'r' read, 'w' write, 'b' both, 'n' none. A new node
// inherits its parent's perms with the creator as owner. `/local/domain/<id>` is created
// owned by <id> when the domain joins, so a guest writes only its own subtree and reads
// what another domain chose to share with it (setPerms).

import { VtpmError } from '../base/errors.ts';

export type PermChar = 'n' | 'r' | 'w' | 'b';
export interface Perm {
  dom: number;
  perm: PermChar;
}

const MAX_PATH = 1024;
const MAX_VALUE = 4096;
const MAX_NODES = 100_000;

export function checkPath(path: unknown): string {
  if (typeof path !== 'string' || path.length === 0 || path.length > MAX_PATH) throw new VtpmError('EINVAL', 'bad xenstore path');
  if (path.startsWith('@')) {
    if (path === '@releaseDomain' || path === '@introduceDomain') return path;
    throw new VtpmError('EINVAL', `bad special path ${path}`);
  }
  if (path !== '/' && (!path.startsWith('/') || path.endsWith('/') || path.includes('//') || !/^[A-Za-z0-9/_@.:-]+$/.test(path))) {
    throw new VtpmError('EINVAL', `bad xenstore path ${path}`);
  }
  return path;
}

export function checkPerms(perms: unknown): Perm[] {
  if (!Array.isArray(perms) || perms.length === 0 || perms.length > 64) throw new VtpmError('EINVAL', 'bad permission list');
  return perms.map((p) => {
    const o = p as Perm;
    if (typeof o !== 'object' || o === null || !Number.isInteger(o.dom) || o.dom < 0 || o.dom > 0xffff || !['n', 'r', 'w', 'b'].includes(o.perm)) {
      throw new VtpmError('EINVAL', 'bad permission entry');
    }
    return { dom: o.dom, perm: o.perm };
  });
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

interface Node {
  value: string;
  perms: Perm[];
  gen: number;
  children: Set<string>;
}

export type TxOp =
  | { op: 'write'; path: string; value: string }
  | { op: 'mkdir'; path: string }
  | { op: 'rm'; path: string }
  | { op: 'setperms'; path: string; perms: Perm[] };

/** The tree, permission checks and change notification (authority side). */
export class XenstoreTree {
  private readonly nodes = new Map<string, Node>();
  private gen = 1;
  /** Inside commit(): each touched path's node as it was before (null: it did not exist), to
   *  roll back by. Only what a transaction touches is saved: copying the whole tree per
   *  transaction grew every xenbus handshake with the number of domains. */
  private journal: Map<string, Node | null> | null = null;
  /** called with each changed path (after the change) and the perms to check readers against */
  onChange: (path: string, perms: Perm[]) => void = () => {};

  constructor() {
    this.nodes.set('/', { value: '', perms: [{ dom: 0, perm: 'n' }], gen: 0, children: new Set() });
  }

  static permOf(perms: Perm[], dom: number): PermChar {
    if (dom === 0 || perms[0]!.dom === dom) return 'b';
    for (let i = 1; i < perms.length; i++) if (perms[i]!.dom === dom) return perms[i]!.perm;
    return perms[0]!.perm;
  }
  static canRead(perms: Perm[], dom: number): boolean {
    const p = XenstoreTree.permOf(perms, dom);
    return p === 'r' || p === 'b';
  }
  static canWrite(perms: Perm[], dom: number): boolean {
    const p = XenstoreTree.permOf(perms, dom);
    return p === 'w' || p === 'b';
  }

  private get(path: string, dom: number): Node {
    const n = this.nodes.get(path);
    if (!n) throw new VtpmError('ENOENT', `${path} does not exist`);
    if (!XenstoreTree.canRead(n.perms, dom)) throw new VtpmError('EPERM', `domain ${dom} may not read ${path}`);
    return n;
  }

  read(path: string, dom: number): { value: string; gen: number } {
    const n = this.get(checkPath(path), dom);
    return { value: n.value, gen: n.gen };
  }
  /** gen of a node for a transaction read set (-1 = absent) */
  genOf(path: string): number {
    return this.nodes.get(path)?.gen ?? -1;
  }
  list(path: string, dom: number): { names: string[]; gen: number } {
    const n = this.get(checkPath(path), dom);
    return { names: [...n.children].sort(), gen: n.gen };
  }
  getPerms(path: string, dom: number): Perm[] {
    return this.get(checkPath(path), dom).perms.map((p) => ({ ...p }));
  }

  /** Check that `op` by `dom` would be allowed (no change made). */
  check(o: TxOp, dom: number): void {
    checkPath(o.path);
    if (o.path.startsWith('@')) throw new VtpmError('EINVAL', 'special paths cannot be written');
    const n = this.nodes.get(o.path);
    if (o.op === 'write' || o.op === 'mkdir') {
      if (o.op === 'write' && (typeof o.value !== 'string' || o.value.length > MAX_VALUE)) throw new VtpmError('EINVAL', 'bad value');
      if (n) {
        if (o.op === 'write' && !XenstoreTree.canWrite(n.perms, dom)) throw new VtpmError('EPERM', `domain ${dom} may not write ${o.path}`);
        return;
      }
      let p = parentOf(o.path);
      while (!this.nodes.has(p)) p = parentOf(p);
      if (!XenstoreTree.canWrite(this.nodes.get(p)!.perms, dom)) throw new VtpmError('EPERM', `domain ${dom} may not create ${o.path}`);
      if (this.nodes.size >= MAX_NODES) throw new VtpmError('EBUSY', 'xenstore full');
      return;
    }
    if (!n) throw new VtpmError('ENOENT', `${o.path} does not exist`);
    if (o.path === '/') throw new VtpmError('EINVAL', 'cannot change /');
    if (o.op === 'rm') {
      if (!XenstoreTree.canWrite(n.perms, dom)) throw new VtpmError('EPERM', `domain ${dom} may not remove ${o.path}`);
      return;
    }
    checkPerms(o.perms);
    if (dom !== 0 && n.perms[0]!.dom !== dom) throw new VtpmError('EPERM', `domain ${dom} does not own ${o.path}`);
  }

  /** Apply `op` (already checked). */
  apply(o: TxOp, dom: number): void {
    const g = ++this.gen;
    switch (o.op) {
      case 'write':
      case 'mkdir': {
        const n = this.nodes.get(o.path);
        if (n) {
          if (o.op === 'write') {
            this.touch(o.path);
            n.value = o.value;
            n.gen = g;
            this.onChange(o.path, n.perms);
          }
          return;
        }
        this.create(o.path, dom, o.op === 'write' ? o.value : '', g);
        return;
      }
      case 'rm':
        this.remove(o.path, g);
        return;
      case 'setperms': {
        const n = this.nodes.get(o.path)!;
        this.touch(o.path);
        n.perms = checkPerms(o.perms);
        n.gen = g;
        this.onChange(o.path, n.perms);
      }
    }
  }

  private create(path: string, dom: number, value: string, g: number): void {
    const parent = parentOf(path);
    if (!this.nodes.has(parent)) this.create(parent, dom, '', g);
    const pn = this.nodes.get(parent)!;
    const perms = pn.perms.map((p) => ({ ...p }));
    if (dom !== 0) perms[0] = { dom, perm: perms[0]!.perm };
    this.touch(path);
    this.touch(parent);
    this.nodes.set(path, { value, perms, gen: g, children: new Set() });
    pn.children.add(path.slice(path.lastIndexOf('/') + 1));
    pn.gen = g;
    this.onChange(path, perms);
  }

  /** Save `path`'s node as it is, once per transaction, before it changes (commit's undo). */
  private touch(path: string): void {
    if (!this.journal || this.journal.has(path)) return;
    const n = this.nodes.get(path);
    this.journal.set(path, n ? { value: n.value, perms: n.perms, gen: n.gen, children: new Set(n.children) } : null);
  }

  private remove(path: string, g: number): void {
    const n = this.nodes.get(path);
    if (!n) return;
    for (const c of [...n.children]) this.remove(path === '/' ? `/${c}` : `${path}/${c}`, g);
    this.touch(path);
    this.nodes.delete(path);
    const pn = this.nodes.get(parentOf(path));
    if (pn) {
      this.touch(parentOf(path));
      pn.children.delete(path.slice(path.lastIndexOf('/') + 1));
      pn.gen = g;
    }
    this.onChange(path, n.perms);
  }

  /** Single operation with checks. */
  exec(o: TxOp, dom: number): void {
    this.check(o, dom);
    this.apply(o, dom);
  }

  /** Atomic commit of a transaction: all reads unchanged and every op allowed (each checked
   *  against the tree as the earlier ops left it), or nothing is applied and no watch fires. */
  commit(ops: TxOp[], reads: { path: string; gen: number }[], dom: number): void {
    for (const r of reads) {
      if (this.genOf(r.path) !== r.gen) throw new VtpmError('EBUSY', `transaction conflict on ${r.path}`);
    }
    const journal = (this.journal = new Map());
    const savedGen = this.gen;
    const fire = this.onChange;
    const events: [string, Perm[]][] = [];
    this.onChange = (p, perms) => events.push([p, perms]);
    try {
      for (const o of ops) {
        this.check(o, dom);
        this.apply(o, dom);
      }
    } catch (e) {
      for (const [p, n] of journal) {
        if (n) this.nodes.set(p, n);
        else this.nodes.delete(p);
      }
      this.gen = savedGen;
      throw e;
    } finally {
      this.journal = null;
      this.onChange = fire;
    }
    for (const [p, perms] of events) fire(p, perms);
  }

  /** Create `/local/domain/<id>` owned by the domain (authority, on join). */
  introduce(domid: number): void {
    const path = `/local/domain/${domid}`;
    if (this.nodes.has(path)) this.remove(path, ++this.gen);
    this.apply({ op: 'mkdir', path }, 0);
    this.apply({ op: 'setperms', path, perms: [{ dom: domid, perm: 'n' }] }, 0);
  }
  release(domid: number): void {
    this.remove(`/local/domain/${domid}`, ++this.gen);
  }
}
