// xenbus front end (the guest side of the vtpm device handshake, as xen-tpmfront). See
// drivers/xen/xenbus-common.ts.
import { VtpmError } from '../base/errors.ts';
import type { Domain } from '../xen/domain.ts';
import { dataPageOffset } from '../xen/layout.ts';
import { TpmifFront } from './tpmif-front.ts';
import { initTpmifPage, type TpmifParams } from '../xen/tpmif-page.ts';
import { backPath, frontPath, XenbusState as S } from '../xen/xenbus-common.ts';
import { readState, XenbusDevice } from '../xen/xenbus-device.ts';

export interface FrontLink {
  params: TpmifParams;
  front: TpmifFront;
  backendId: number;
}

export class XenbusFront extends XenbusDevice<FrontLink> {
  private backendId = -1;
  private bpath = '';
  private unwatchB: (() => Promise<void>) | null = null;
  private unwatchF: (() => Promise<void>) | null = null;
  private res: { page: number; extraPage: number; ref: number; extraRef: number; port: number } | null = null;

  private constructor(dom: Domain, readonly devid: number, readonly reconnect: boolean) {
    super(dom, frontPath(dom.domid, devid), S.Initialising);
  }

  static async start(dom: Domain, opts: { backendId: number; devid?: number; reconnect?: boolean }): Promise<XenbusFront> {
    const xf = new XenbusFront(dom, opts.devid ?? 0, opts.reconnect !== false);
    const f = xf.ownPath;
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

  protected async step(): Promise<void> {
    const st = this.dom.store;
    if (this.state === S.Closed && (this.closing || !this.reconnect)) return;
    // follow the backend pointer (a toolstack may move it)
    const bid = Number(await st.readOpt(`${this.ownPath}/backend-id`).catch(() => undefined));
    const bp = await st.readOpt(`${this.ownPath}/backend`).catch(() => undefined);
    if (Number.isInteger(bid) && bp && (bid !== this.backendId || bp !== this.bpath)) {
      if (this.res) await this.teardown(true);
      await this.unwatchB?.();
      this.backendId = bid;
      this.bpath = bp;
      // open our directory (and the keys already in it) to the new back end for reading
      const perms = [{ dom: this.dom.domid, perm: 'n' as const }, { dom: bid, perm: 'r' as const }];
      const keys = await st.list(this.ownPath).catch(() => [] as string[]);
      await st
        .transaction(async (tx) => {
          tx.setPerms(this.ownPath, perms);
          for (const k of keys) tx.setPerms(`${this.ownPath}/${k}`, perms);
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
    const f = this.ownPath;
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
          for (const k of ['ring-ref', 'event-channel']) tx.rm(`${this.ownPath}/${k}`);
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
    const done = this.beginClose(timeoutMs, () => this.teardown(false));
    if (!done) return;
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
