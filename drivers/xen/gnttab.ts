// Grant table: a domain grants one of its 4 KiB data pages to another domid and gets a
// grant reference; the grantee maps it (a Buffer over the same physical page, no copy).
//
// API (per domain, reached as `domain.gnttab`):
//   allocPage() → page            a zeroed data page of our own file
//   pageBuffer(page) → Buffer     our view of it
//   grantAccess(domid, page, readonly) → ref      (local: writes the grant entry)
//   endAccess(ref)                EBUSY while mapped, ENOENT if not granted, EINVAL if out of range
//   map(granterDomid, ref, writable) → Promise<GrantMapping>   (checked by the authority)
//   unmap(mapping) → Promise<void>
//   freePage(page)
// In a worker thread: `attachGrant(mapping.params)` maps the same page from plain
// parameters {path, offset, writable} without talking to the authority.
//
// ENFORCEMENT BOUNDARY. Each domain's pages live in its own file DIR/mem/dom<id>, mode 0600,
// created by the authority. Today every participant runs as the same user, so the kernel
// would let a process open any domain's file: the rules are enforced by the authority's
// grant check (`checkAndMap` below, run inside the authority process) and by the library
// only opening a file after the authority answered a `map` request with its path. To make
// the kernel enforce them, run each domain as its own uid and have the authority pass an
// already-opened descriptor (O_RDONLY for read-only grants) over SCM_RIGHTS instead of the
// path in its `map` reply; nothing else in the protocol changes. Ending access while
// mapped is enforced in shared memory with compare-and-swap on the entry word, which the
// granter and the authority both update.

import { VtpmError } from '../base/errors.ts';
import {
  DATA_PAGES, GNT_DOMMASK, GNT_ENTRIES, GNT_INUSE, GNT_MAPMASK, GNT_MAPSHIFT, GNT_RO, GNT_START, PAGE, dataPageOffset,
} from './layout.ts';
import { mapFile, type Mapping } from '../base/libc.ts';

/** Plain, serialisable description of a mapped grant (for worker threads). */
export interface GrantParams {
  path: string;
  /** byte offset of the page in that file */
  offset: number;
  writable: boolean;
}

export interface GrantMapping {
  readonly granter: number;
  readonly ref: number;
  readonly buf: Buffer;
  readonly params: GrantParams;
}

/** Map a granted page from its parameters (any thread; no authority check — the
 *  parameters come from an authority-checked map in the owning thread). */
export function attachGrant(p: GrantParams): { buf: Buffer; mapping: Mapping } {
  if (!p || typeof p.path !== 'string' || !Number.isInteger(p.offset) || p.offset % PAGE !== 0) throw new VtpmError('EINVAL', 'bad grant parameters');
  const m = mapFile(p.path, p.offset, PAGE, p.writable);
  return { buf: Buffer.from(m.buffer, 0, PAGE), mapping: m };
}

export interface GnttabHost {
  readonly domid: number;
  readonly mem: Mapping;
  request(op: string, args: Record<string, unknown>): Promise<Record<string, unknown>>;
}

export class Gnttab {
  private readonly w: Int32Array;
  private readonly used = new Uint8Array(DATA_PAGES);
  private readonly maps = new Map<GrantMapping, Mapping>();

  constructor(private readonly host: GnttabHost) {
    this.w = new Int32Array(host.mem.buffer, GNT_START * PAGE, GNT_ENTRIES * 2);
  }

  allocPage(): number {
    const p = this.used.indexOf(0);
    if (p < 0) throw new VtpmError('EBUSY', 'no free data page');
    this.used[p] = 1;
    this.pageBuffer(p).fill(0);
    return p;
  }
  freePage(page: number): void {
    this.checkPage(page);
    this.used[page] = 0;
  }
  pageBuffer(page: number): Buffer {
    this.checkPage(page);
    return Buffer.from(this.host.mem.buffer, dataPageOffset(page), PAGE);
  }
  private checkPage(page: number): void {
    if (!Number.isInteger(page) || page < 0 || page >= DATA_PAGES) throw new VtpmError('EINVAL', `page ${page} out of range`);
  }

  grantAccess(domid: number, page: number, readonly: boolean): number {
    if (!Number.isInteger(domid) || domid < 0 || domid > GNT_DOMMASK) throw new VtpmError('EINVAL', `bad domid ${domid}`);
    this.checkPage(page);
    if (!this.used[page]) throw new VtpmError('EINVAL', `page ${page} is not allocated`);
    const word = (GNT_INUSE | (readonly ? GNT_RO : 0) | domid) | 0;
    for (let ref = 1; ref < GNT_ENTRIES; ref++) {
      // reserve with a placeholder (in use, grantee 0xffff, read-only) then fill in
      if (Atomics.compareExchange(this.w, ref * 2, 0, (GNT_INUSE | GNT_RO | GNT_DOMMASK) | 0) === 0) {
        Atomics.store(this.w, ref * 2 + 1, page);
        Atomics.store(this.w, ref * 2, word);
        return ref;
      }
    }
    throw new VtpmError('EBUSY', 'grant table full');
  }

  endAccess(ref: number): void {
    if (!Number.isInteger(ref) || ref <= 0 || ref >= GNT_ENTRIES) throw new VtpmError('EINVAL', `grant ref ${ref} out of range`);
    for (;;) {
      const v = Atomics.load(this.w, ref * 2);
      if (!(v & GNT_INUSE)) throw new VtpmError('ENOENT', `grant ref ${ref} is not granted`);
      if (v & GNT_MAPMASK) throw new VtpmError('EBUSY', `grant ref ${ref} is still mapped by domain ${v & GNT_DOMMASK}`);
      if (Atomics.compareExchange(this.w, ref * 2, v, 0) === v) {
        Atomics.store(this.w, ref * 2 + 1, 0);
        return;
      }
    }
  }

  /** Map a page another domain granted us. */
  async map(granter: number, ref: number, writable: boolean): Promise<GrantMapping> {
    const r = await this.host.request('map', { granter, ref, writable });
    const params: GrantParams = { path: String(r.path), offset: Number(r.offset), writable };
    let att: { buf: Buffer; mapping: Mapping };
    try {
      att = attachGrant(params);
    } catch (e) {
      await this.host.request('unmap', { granter, ref }).catch(() => {});
      throw e;
    }
    const gm: GrantMapping = { granter, ref, buf: att.buf, params };
    this.maps.set(gm, att.mapping);
    return gm;
  }

  async unmap(gm: GrantMapping): Promise<void> {
    const m = this.maps.get(gm);
    if (!m) throw new VtpmError('ENOENT', 'not a live mapping');
    this.maps.delete(gm);
    m.unmap();
    await this.host.request('unmap', { granter: gm.granter, ref: gm.ref });
  }

  /** Mappings still held (for teardown). */
  mappings(): GrantMapping[] {
    return [...this.maps.keys()];
  }
}

/** Authority side: check a map request against the granter's table and count the mapping.
 *  Returns the byte offset of the page in the granter's file. */
export function checkAndMap(table: Int32Array, granter: number, ref: number, grantee: number, writable: boolean): number {
  if (!Number.isInteger(ref) || ref <= 0 || ref >= GNT_ENTRIES) throw new VtpmError('EINVAL', `grant ref ${ref} out of range`);
  for (;;) {
    const v = Atomics.load(table, ref * 2);
    if (!(v & GNT_INUSE)) throw new VtpmError('ENOENT', `grant ref ${ref} of domain ${granter} is not granted`);
    if ((v & GNT_DOMMASK) !== grantee) throw new VtpmError('EPERM', `grant ref ${ref} of domain ${granter} is not granted to domain ${grantee}`);
    if (writable && v & GNT_RO) throw new VtpmError('EPERM', `grant ref ${ref} of domain ${granter} is read-only`);
    const count = (v & GNT_MAPMASK) >>> GNT_MAPSHIFT;
    if (count >= 0xfff) throw new VtpmError('EBUSY', 'too many mappings');
    const nv = (v + (1 << GNT_MAPSHIFT)) | 0;
    if (Atomics.compareExchange(table, ref * 2, v, nv) === v) {
      const page = Atomics.load(table, ref * 2 + 1);
      if (page < 0 || page >= DATA_PAGES) throw new VtpmError('EINVAL', 'corrupt grant entry');
      return dataPageOffset(page);
    }
  }
}

/** Authority side: drop one mapping count. */
export function unmapCount(table: Int32Array, ref: number): void {
  for (;;) {
    const v = Atomics.load(table, ref * 2);
    if (!(v & GNT_INUSE) || !(v & GNT_MAPMASK)) return;
    const nv = (v - (1 << GNT_MAPSHIFT)) | 0;
    if (Atomics.compareExchange(table, ref * 2, v, nv) === v) return;
  }
}
