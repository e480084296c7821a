// Xenbus: the vtpm device handshake between a front end and a back end, through xenstore.
//
// Paths (as xen-tpmfront / tpmback): front  /local/domain/<front>/device/vtpm/<n>/
//   state, backend, backend-id, ring-ref, event-channel, feature-protocol-v2
// back   /local/domain/<back>/backend/vtpm/<front>/<n>/   state, frontend, frontend-id, uuid
// States: 1 Initialising, 2 InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed.
//
// Back end (e.g. vtpmd):
//   const xb = await XenbusBack.start(domain, { frontId, devid: 0, uuid })  // publishes InitWait
//   xb.onConnect((link) => { ... link.params (TpmifParams for a worker), link.back (TpmifBack) })
//   xb.onDisconnect(() => stop the serve loop)       // front closed or died; back returns
//                                                      // to InitWait so a front can (re)attach
//   const link = await xb.connected(timeoutMs)
//   await xb.close()                                  // Closing → wait front → unmap/unbind → Closed
// Front end (e.g. the FUSE node):
//   const xf = await XenbusFront.start(domain, { backendId, devid: 0 })  // needs the back's dir
//   const link = await xf.connected(timeoutMs)   // link.params for a worker, link.front (TpmifFront)
//   xf.onDisconnect(cb)      // back end closed or died: grant ended, port closed; with
//                            // reconnect (default) the front goes back to Initialising and
//                            // redoes the handshake when a back end publishes InitWait again
//   await xf.close()         // Closing → wait back → end grants, close port → Closed
// Who points at whom: each side writes its own pointer keys (`backend`/`backend-id`,
// `frontend`/`frontend-id`) and opens its directory for reading by the peer. A toolstack in
// domain 0 may move a front to a new back end (a restarted vtpmd gets a new domid) with
// `retargetFront(store0, frontId, devid, newBackId)`; the front follows on the next watch.

import { VtpmError } from '../tpm/errors.ts';
import type { Domain } from './domain.ts';
import type { GrantMapping } from './gnttab.ts';
import { dataPageOffset } from './layout.ts';
import { TpmifBack, TpmifFront, initTpmifPage, tpmifExtraRef, type TpmifParams } from './tpmif.ts';
import type { XenStore } from './xenstore.ts';

export const XenbusState = { Unknown: 0, Initialising: 1, InitWait: 2, Initialised: 3, Connected: 4, Closing: 5, Closed: 6 } as const;
const S = XenbusState;

export function frontPath(frontId: number, devid: number): string {
  return `/local/domain/${frontId}/device/vtpm/${devid}`;
}
export function backPath(backId: number, frontId: number, devid: number): string {
  return `/local/domain/${backId}/backend/vtpm/${frontId}/${devid}`;
}

/** Domain-0 toolstack: point a front's device at another back end domain. */
export async function retargetFront(store0: XenStore, frontId: number, devid: number, backId: number): Promise<void> {
  const f = frontPath(frontId, devid);
  await store0.transaction(async (tx) => {
    tx.write(`${f}/backend`, backPath(backId, frontId, devid));
    tx.write(`${f}/backend-id`, String(backId));
  });
}

async function readState(store: XenStore, path: string): Promise<number> {
  try {
    const v = await store.readOpt(`${path}/state`);
    return v === undefined ? 0 : Number(v) || 0;
  } catch {
    return 0; // gone or not readable: treat like a vanished peer
  }
}

/** Runs `fn` serially, coalescing triggers that arrive while it runs. */
class Serial {
  private running = false;
  private again = false;
  constructor(private readonly fn: () => Promise<void>, private readonly onError: (e: unknown) => void) {}
  kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    void (async () => {
      do {
        this.again = false;
        try {
          await this.fn();
        } catch (e) {
          this.onError(e);
        }
      } while (this.again);
      this.running = false;
    })();
  }
}

class Waiters<T> {
  private list: { resolve: (v: T) => void; reject: (e: Error) => void }[] = [];
  wait(timeoutMs: number, what: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => {
        this.list = this.list.filter((w) => w.resolve !== res);
        reject(new VtpmError('ETIMEDOUT', `${what} not reached within ${timeoutMs} ms`));
      }, timeoutMs);
      const res = (v: T): void => {
        clearTimeout(t);
        resolve(v);
      };
      this.list.push({ resolve: res, reject: (e) => (clearTimeout(t), reject(e)) });
    });
  }
  resolve(v: T): void {
    for (const w of this.list.splice(0)) w.resolve(v);
  }
  reject(e: Error): void {
    for (const w of this.list.splice(0)) w.reject(e);
  }
}

export interface FrontLink {
  params: TpmifParams;
  front: TpmifFront;
  backendId: number;
}

export class XenbusFront {
  state: number = S.Initialising;
  link: FrontLink | null = null;
  private backendId = -1;
  private bpath = '';
  private unwatchB: (() => Promise<void>) | null = null;
  private unwatchF: (() => Promise<void>) | null = null;
  private res: { page: number; extraPage: number; ref: number; extraRef: number; port: number } | null = null;
  private closing = false;
  private readonly serial: Serial;
  private readonly conn = new Waiters<FrontLink>();
  private readonly closed = new Waiters<void>();
  private readonly disconnectCbs: (() => void)[] = [];
  private readonly fpath: string;

  private constructor(readonly dom: Domain, readonly devid: number, readonly reconnect: boolean) {
    this.fpath = frontPath(dom.domid, devid);
    this.serial = new Serial(() => this.step(), (e) => {
      if (process.env.VTPM_DEBUG) process.stderr.write(`xenbus: ${(e as Error).stack}\n`);
    });
  }

  static async start(dom: Domain, opts: { backendId: number; devid?: number; reconnect?: boolean }): Promise<XenbusFront> {
    const xf = new XenbusFront(dom, opts.devid ?? 0, opts.reconnect !== false);
    const f = xf.fpath;
    const st = dom.store;
    await st.transaction(async (tx) => {
      // perms first: the keys below inherit them
      tx.mkdir(f);
      tx.setPerms(f, [{ dom: dom.domid, perm: 'n' }, { dom: opts.backendId, perm: 'r' }]);
      tx.write(`${f}/backend`, backPath(opts.backendId, dom.domid, xf.devid));
      tx.write(`${f}/backend-id`, String(opts.backendId));
      tx.write(`${f}/state`, String(S.Initialising));
    });
    xf.unwatchF = await st.watch(f, () => xf.serial.kick());
    return xf;
  }

  onDisconnect(cb: () => void): void {
    this.disconnectCbs.push(cb);
  }

  connected(timeoutMs = 30_000): Promise<FrontLink> {
    if (this.state === S.Connected && this.link) return Promise.resolve(this.link);
    return this.conn.wait(timeoutMs, 'xenbus Connected');
  }

  private async setState(s: number): Promise<void> {
    this.state = s;
    await this.dom.store.write(`${this.fpath}/state`, String(s));
  }

  private async step(): Promise<void> {
    const st = this.dom.store;
    if (this.state === S.Closed && (this.closing || !this.reconnect)) return;
    // follow the backend pointer (a toolstack may move it)
    const bid = Number(await st.readOpt(`${this.fpath}/backend-id`).catch(() => undefined));
    const bp = await st.readOpt(`${this.fpath}/backend`).catch(() => undefined);
    if (Number.isInteger(bid) && bp && (bid !== this.backendId || bp !== this.bpath)) {
      if (this.res) await this.teardown(true);
      await this.unwatchB?.();
      this.backendId = bid;
      this.bpath = bp;
      // open our directory (and the keys already in it) to the new back end for reading
      const perms = [{ dom: this.dom.domid, perm: 'n' as const }, { dom: bid, perm: 'r' as const }];
      const keys = await st.list(this.fpath).catch(() => [] as string[]);
      await st
        .transaction(async (tx) => {
          tx.setPerms(this.fpath, perms);
          for (const k of keys) tx.setPerms(`${this.fpath}/${k}`, perms);
        })
        .catch(() => {});
      this.unwatchB = await st.watch(bp, () => this.serial.kick());
    }
    if (this.backendId < 0) return;
    const bs = await readState(st, this.bpath);
    if (this.closing) {
      if (bs === S.Closed || bs === S.InitWait || bs === 0 || bs === S.Closing) {
        await this.teardown(false);
        await this.setState(S.Closed);
        this.closed.resolve();
      }
      return;
    }
    switch (this.state) {
      case S.Initialising:
      case S.Closed:
        if (bs === S.InitWait) await this.initialise();
        return;
      case S.Initialised:
        if (bs === S.Connected) {
          await this.setState(S.Connected);
          this.conn.resolve(this.link!);
        } else if (bs === 0 || bs >= S.Closing) await this.teardown(true);
        return;
      case S.Connected:
        if (bs !== S.Connected) await this.teardown(true);
        return;
    }
  }

  private async initialise(): Promise<void> {
    const d = this.dom;
    const g = d.gnttab;
    const page = g.allocPage();
    const extraPage = g.allocPage();
    const extraRef = g.grantAccess(this.backendId, extraPage, false);
    initTpmifPage(g.pageBuffer(page), extraRef);
    const ref = g.grantAccess(this.backendId, page, false);
    const port = d.evtchn.allocUnbound(this.backendId);
    this.res = { page, extraPage, ref, extraRef, port };
    const params: TpmifParams = {
      page: { path: d.memPath, offset: dataPageOffset(page), writable: true },
      extra: { path: d.memPath, offset: dataPageOffset(extraPage), writable: true },
      evtchn: d.evtchn.params(port),
    };
    this.link = { params, front: new TpmifFront(g.pageBuffer(page), g.pageBuffer(extraPage), d.evtchn.endpoint(port)), backendId: this.backendId };
    const f = this.fpath;
    await d.store.transaction(async (tx) => {
      tx.write(`${f}/ring-ref`, String(ref));
      tx.write(`${f}/event-channel`, String(port));
      tx.write(`${f}/feature-protocol-v2`, '1');
      tx.write(`${f}/state`, String(S.Initialised));
    });
    this.state = S.Initialised;
  }

  /** Close the port, tell the back end, end the grants once it unmapped them. */
  private async teardown(fromPeer: boolean): Promise<void> {
    const r = this.res;
    const wasUp = r !== null;
    this.res = null;
    this.link = null;
    if (r) {
      try {
        this.dom.evtchn.close(r.port);
      } catch {
        /* already closed */
      }
    }
    if (fromPeer) await this.setState(this.reconnect ? S.Initialising : S.Closed).catch(() => {});
    if (r) {
      for (const ref of [r.ref, r.extraRef]) {
        for (let i = 0; ; i++) {
          try {
            this.dom.gnttab.endAccess(ref);
            break;
          } catch (e) {
            if (!(e instanceof VtpmError && e.code === 'EBUSY') || i > 250) break; // leak rather than hang
            await new Promise((res) => setTimeout(res, 20));
          }
        }
      }
      this.dom.gnttab.freePage(r.page);
      this.dom.gnttab.freePage(r.extraPage);
      await this.dom.store
        .transaction(async (tx) => {
          for (const k of ['ring-ref', 'event-channel']) tx.rm(`${this.fpath}/${k}`);
        })
        .catch(() => {});
    }
    if (fromPeer) {
      if (wasUp) for (const cb of this.disconnectCbs) cb();
      if (this.reconnect) this.serial.kick();
    }
  }

  /** Orderly close: Closing, wait for the back end (≤ timeoutMs), release everything, Closed. */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const done = this.closed.wait(timeoutMs, 'xenbus Closed').catch(async () => {
      await this.teardown(false);
      await this.setState(S.Closed).catch(() => {});
    });
    this.conn.reject(new VtpmError('ECLOSED', 'front end closing'));
    if (this.res) await this.setState(S.Closing);
    else {
      await this.setState(S.Closed).catch(() => {});
      this.closed.resolve();
    }
    this.serial.kick();
    await done;
    await this.unwatchB?.();
    await this.unwatchF?.();
  }
}

export interface BackLink {
  params: TpmifParams;
  back: TpmifBack;
  frontId: number;
}

export class XenbusBack {
  state: number = S.Initialising;
  link: BackLink | null = null;
  private maps: GrantMapping[] = [];
  private port = -1;
  private closing = false;
  private unwatchF: (() => Promise<void>) | null = null;
  private readonly serial: Serial;
  private readonly conn = new Waiters<BackLink>();
  private readonly closed = new Waiters<void>();
  private readonly connectCbs: ((l: BackLink) => void)[] = [];
  private readonly disconnectCbs: (() => void)[] = [];
  private readonly bpath: string;
  private readonly fpath: string;

  private constructor(readonly dom: Domain, readonly frontId: number, readonly devid: number) {
    this.bpath = backPath(dom.domid, frontId, devid);
    this.fpath = frontPath(frontId, devid);
    this.serial = new Serial(() => this.step(), (e) => {
      if (process.env.VTPM_DEBUG) process.stderr.write(`xenbus: ${(e as Error).stack}\n`);
    });
  }

  static async start(dom: Domain, opts: { frontId: number; devid?: number; uuid: string }): Promise<XenbusBack> {
    const xb = new XenbusBack(dom, opts.frontId, opts.devid ?? 0);
    const b = xb.bpath;
    await dom.store.transaction(async (tx) => {
      tx.mkdir(b);
      tx.setPerms(b, [{ dom: dom.domid, perm: 'n' }, { dom: opts.frontId, perm: 'r' }]);
      tx.write(`${b}/frontend`, xb.fpath);
      tx.write(`${b}/frontend-id`, String(opts.frontId));
      tx.write(`${b}/uuid`, opts.uuid);
      tx.write(`${b}/state`, String(S.InitWait));
    });
    xb.state = S.InitWait;
    xb.unwatchF = await dom.store.watch(xb.fpath, () => xb.serial.kick());
    return xb;
  }

  onConnect(cb: (l: BackLink) => void): void {
    this.connectCbs.push(cb);
  }
  onDisconnect(cb: () => void): void {
    this.disconnectCbs.push(cb);
  }
  connected(timeoutMs = 30_000): Promise<BackLink> {
    if (this.state === S.Connected && this.link) return Promise.resolve(this.link);
    return this.conn.wait(timeoutMs, 'xenbus Connected');
  }

  private async setState(s: number): Promise<void> {
    this.state = s;
    await this.dom.store.write(`${this.bpath}/state`, String(s));
  }

  private async step(): Promise<void> {
    const st = this.dom.store;
    const fs = await readState(st, this.fpath);
    if (this.closing) {
      if (fs === S.Closed || fs === 0 || fs === S.Initialising || fs === S.Closing) {
        await this.teardown();
        await this.setState(S.Closed);
        this.closed.resolve();
      }
      return;
    }
    switch (this.state) {
      case S.InitWait:
        if (fs === S.Initialised) await this.connect();
        return;
      case S.Connected:
        if (fs !== S.Connected && fs !== S.Initialised) {
          await this.teardown();
          for (const cb of this.disconnectCbs) cb();
          await this.setState(S.Closed);
          // ready for a new front end
          await this.setState(S.InitWait);
          this.serial.kick();
        }
        return;
    }
  }

  private async connect(): Promise<void> {
    const st = this.dom.store;
    const f = this.fpath;
    const proto = await st.readOpt(`${f}/feature-protocol-v2`);
    const ref = Number(await st.read(`${f}/ring-ref`));
    const port = Number(await st.read(`${f}/event-channel`));
    if (proto !== '1') throw new VtpmError('EPROTO', 'front end lacks feature-protocol-v2');
    const g = this.dom.gnttab;
    const m = await g.map(this.frontId, ref, true);
    this.maps = [m];
    const extraRef = tpmifExtraRef(m.buf);
    const mx = await g.map(this.frontId, extraRef, true);
    this.maps.push(mx);
    this.port = await this.dom.evtchn.bindInterdomain(this.frontId, port);
    const params: TpmifParams = { page: m.params, extra: mx.params, evtchn: this.dom.evtchn.params(this.port) };
    this.link = { params, back: new TpmifBack(m.buf, mx.buf, this.dom.evtchn.endpoint(this.port)), frontId: this.frontId };
    await this.setState(S.Connected);
    for (const cb of this.connectCbs) cb(this.link);
    this.conn.resolve(this.link);
  }

  private async teardown(): Promise<void> {
    if (this.port >= 0) {
      try {
        this.dom.evtchn.close(this.port);
      } catch {
        /* gone */
      }
      this.port = -1;
    }
    for (const m of this.maps.splice(0)) await this.dom.gnttab.unmap(m).catch(() => {});
    this.link = null;
  }

  /** Orderly close from the back end: Closing, wait for the front (≤ timeoutMs), Closed. */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.conn.reject(new VtpmError('ECLOSED', 'back end closing'));
    const done = this.closed.wait(timeoutMs, 'xenbus Closed').catch(async () => {
      await this.teardown();
      await this.setState(S.Closed).catch(() => {});
    });
    const wasUp = this.port >= 0;
    await this.setState(S.Closing);
    if (wasUp) {
      // the front end sees Closing, releases and goes Initialising/Closed; we then unmap
      for (const cb of this.disconnectCbs) cb();
    }
    this.serial.kick();
    await done;
    await this.unwatchF?.();
  }
}
