// xenbus back end (vtpmd's side of the vtpm device handshake, as mini-os tpmback). See
// drivers/xen/xenbus-common.ts.
import { VtpmError } from '../base/errors.ts';
import type { Domain } from '../xen/domain.ts';
import type { GrantMapping } from '../xen/gnttab.ts';
import { tpmifExtraRef, type TpmifParams } from '../xen/tpmif-page.ts';
import { backPath, frontPath, XenbusState as S } from '../xen/xenbus-common.ts';
import { readState, XenbusDevice } from '../xen/xenbus-device.ts';

/** A connected device: the shared page(s) and channel as plain parameters, for the worker
 *  thread that serves it (TpmifBack.attach). */
export interface BackLink {
  params: TpmifParams;
  frontId: number;
}

export class XenbusBack extends XenbusDevice<BackLink> {
  private maps: GrantMapping[] = [];
  private port = -1;
  private unwatchF: (() => Promise<void>) | null = null;
  private readonly connectCbs: ((l: BackLink) => void)[] = [];
  private readonly fpath: string;

  private constructor(dom: Domain, readonly frontId: number, readonly devid: number) {
    super(dom, backPath(dom.domid, frontId, devid), S.Initialising);
    this.fpath = frontPath(frontId, devid);
  }

  static async start(dom: Domain, opts: { frontId: number; devid?: number; uuid: string }): Promise<XenbusBack> {
    const xb = new XenbusBack(dom, opts.frontId, opts.devid ?? 0);
    const b = xb.ownPath;
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

  /** Name the instance this back end serves (xenstore's uuid node), once it is known. */
  async setUuid(uuid: string): Promise<void> {
    await this.dom.store.write(`${this.ownPath}/uuid`, uuid);
  }

  onConnect(cb: (l: BackLink) => void): void {
    this.connectCbs.push(cb);
  }

  protected async step(): Promise<void> {
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
    this.link = { params, frontId: this.frontId };
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
    const done = this.beginClose(timeoutMs, () => this.teardown());
    if (!done) return;
    this.conn.reject(new VtpmError('ECLOSED', 'back end closing'));
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
