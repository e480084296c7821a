// A domain: one participant (process) known to the authority by its domid.
//
//   const dom = await Domain.join(dir, { host?: boolean, name?: string })
//   dom.domid        0 for the host/manager (join with host: true, once), else a new id
//   dom.gnttab       grant table (gnttab.ts)
//   dom.evtchn       event-channel ports (evtchn-ports.ts; one end: evtchn.ts)
//   dom.store        xenstore client (xenstore-client.ts)
//   dom.onLost(cb)   the authority connection dropped (the domain is dead to the others)
//   await dom.leave()   closes ports, drops mappings, disconnects: the authority reaps it
//
// The authority must already run for `dir` (startAuthority in authority-launch.ts spawns one).
// The domid is bound to the connection: every request acts as this domain.

import { VtpmError } from '../base/errors.ts';
import type { Msg } from '../base/frame.ts';
import { RpcClient } from '../base/rpc.ts';
import { FILE_BYTES, socketPath } from './layout.ts';
import { mapFile, procStartTime, type Mapping } from '../base/libc.ts';
import { Gnttab } from './gnttab.ts';
import { EvtchnPorts } from './evtchn-ports.ts';
import { XenStore } from './xenstore-client.ts';

export class Domain {
  readonly pid = process.pid;
  readonly start = procStartTime(process.pid);
  domid = -1;
  memPath = '';
  mem!: Mapping;
  gnttab!: Gnttab;
  evtchn!: EvtchnPorts;
  readonly store: XenStore;
  private rpc!: RpcClient;

  private constructor(readonly dir: string) {
    this.store = new XenStore(this);
  }

  static async join(dir: string, opts: { host?: boolean; name?: string } = {}): Promise<Domain> {
    const d = new Domain(dir);
    await d.connect();
    const r = await d.request('hello', { pid: d.pid, start: d.start, host: opts.host === true, name: opts.name ?? '' }).catch((e) => {
      d.rpc.destroy();
      throw e;
    });
    d.domid = Number(r.domid);
    d.memPath = String(r.mem);
    d.mem = mapFile(d.memPath, 0, FILE_BYTES, true);
    d.gnttab = new Gnttab(d);
    d.evtchn = new EvtchnPorts(d);
    return d;
  }

  private async connect(): Promise<void> {
    const onEvent = (m: Msg): void => {
      if (m.ev === 'watch') this.store.dispatch(String(m.token), String(m.path));
      else if (m.ev === 'bound') this.evtchn?.peerBound(Number(m.port));
    };
    this.rpc = await RpcClient.connect(socketPath(this.dir), `the authority at ${this.dir}`, onEvent).catch((e: Error) => {
      // keep the message callers know: "no authority at DIR: <why>"
      const why = e.cause instanceof Error ? e.cause : e;
      throw new VtpmError('ENOENT', `no authority at ${this.dir}: ${why.message}`, { cause: why });
    });
  }

  /** One request to the authority (used by gnttab, evtchn, xenstore). */
  request(op: string, args: Msg): Promise<Msg> {
    return this.rpc.request(op, args);
  }

  onLost(cb: () => void): void {
    this.rpc.onLost(() => cb());
  }

  /** Leave: close our ports, drop our mappings, disconnect (the authority reaps the rest). */
  async leave(): Promise<void> {
    if (this.rpc.isLost) return;
    this.evtchn?.closeAll();
    for (const m of this.gnttab?.mappings() ?? []) await this.gnttab.unmap(m).catch(() => {});
    await this.rpc.end();
    // the memory mapping stays until exit: views handed out must never fault
  }
}
