// The authority's registry of live domains: a domain is born on `hello` (domid, memory
// file with its header) and reaped when its connection drops (mappings it held given back,
// its channels and every channel bound to them closed with the waiters woken, its xenstore
// subtree removed, its memory file unlinked, `@releaseDomain` fired).
import fs from 'node:fs';
import { VtpmError } from '../base/errors.ts';
import { mapFile, type Mapping } from '../base/libc.ts';
import { closeChannelsOf } from './evtchn-ports.ts';
import type { EventArea } from './evtchn-2l.ts';
import { unmapCount } from './gnttab.ts';
import { FILE_BYTES, GNT_ENTRIES, GNT_START, HDR_DOMID, HDR_MAGIC, HDR_PID, HDR_START, HDR_VERSION, LAYOUT_VERSION, MAGIC, PAGE, memPath } from './layout.ts';
import type { XenstoreTree } from './xenstore-tree.ts';

/** One client connection's state (the RpcServer's per-peer data): one domain once it said hello. */
export interface Conn {
  domid: number | null;
  watches: Map<string, string>; // token → path
}

export interface DomainRec {
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

export class DomainTable {
  private readonly domains = new Map<number, DomainRec>();
  private nextDomid = 1;

  /** `fire` notifies the watchers of a special path (@introduceDomain, @releaseDomain). */
  constructor(private readonly dir: string, private readonly tree: XenstoreTree, private readonly fire: (special: string) => void) {}

  get(domid: number): DomainRec | undefined {
    return this.domains.get(domid);
  }
  /** The domain a connection speaks for (EPERM before hello). */
  of(conn: Conn): DomainRec {
    const d = conn.domid === null ? undefined : this.domains.get(conn.domid);
    if (!d) throw new VtpmError('EPERM', 'say hello first');
    return d;
  }
  ids(): number[] {
    return [...this.domains.keys()];
  }

  /** A new domain for `conn`: domid 0 once for the host, else the next free id. */
  introduce(conn: Conn, who: { pid: number; start: number; host: boolean; name: string }): DomainRec {
    if (conn.domid !== null) throw new VtpmError('EBUSY', `this connection already is domain ${conn.domid}`);
    let domid: number;
    if (who.host) {
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
    w[HDR_PID] = who.pid;
    w[HDR_START] = who.start;
    const rec: DomainRec = {
      domid, pid: who.pid, start: who.start, name: who.name.slice(0, 64), path: p, mem, w,
      table: new Int32Array(mem.buffer, GNT_START * PAGE, GNT_ENTRIES * 2), held: new Map(), conn,
    };
    this.domains.set(domid, rec);
    conn.domid = domid;
    if (domid !== 0) this.tree.introduce(domid);
    else this.tree.apply({ op: 'mkdir', path: '/local/domain/0' }, 0);
    this.fire('@introduceDomain');
    return rec;
  }

  /** The connection of `conn` dropped: reap its domain (if it still is that domain's). */
  dropped(conn: Conn): void {
    const d = conn.domid === null ? undefined : this.domains.get(conn.domid);
    if (d && d.conn === conn) this.reap(d);
  }

  reapAll(): void {
    for (const d of [...this.domains.values()]) this.reap(d);
  }

  private reap(d: DomainRec): void {
    this.domains.delete(d.domid);
    for (const [key, n] of d.held) {
      const [g, ref] = key.split(':').map(Number) as [number, number];
      const gd = this.domains.get(g);
      if (gd) for (let i = 0; i < n; i++) unmapCount(gd.table, ref);
    }
    const areaOf = (domid: number): EventArea | undefined => {
      const x = domid === d.domid ? d : this.domains.get(domid);
      return x && { h: x.w, addr: x.mem.addr, mapping: null };
    };
    closeChannelsOf(d.w, d.mem.addr, d.domid, true, areaOf);
    for (const o of this.domains.values()) closeChannelsOf(o.w, o.mem.addr, d.domid, false, areaOf);
    this.tree.release(d.domid);
    d.mem.unmap();
    fs.rmSync(d.path, { force: true });
    this.fire('@releaseDomain');
  }
}
