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

import net from 'node:net';
import { VtpmError, type VtpmErrorCode } from '../base/errors.ts';
import { FrameReader, PROTO_VERSION, encodeFrame } from '../base/frame.ts';
import { FILE_BYTES, socketPath } from './layout.ts';
import { mapFile, procStartTime, type Mapping } from '../base/libc.ts';
import { Gnttab } from './gnttab.ts';
import { EvtchnPorts } from './evtchn-ports.ts';
import { XenStore } from './xenstore-client.ts';

type Pending = { resolve: (m: Record<string, unknown>) => void; reject: (e: Error) => void };

export class Domain {
  readonly pid = process.pid;
  readonly start = procStartTime(process.pid);
  domid = -1;
  memPath = '';
  mem!: Mapping;
  gnttab!: Gnttab;
  evtchn!: EvtchnPorts;
  readonly store: XenStore;
  private sock!: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private lost = false;
  private readonly lostCbs: (() => void)[] = [];

  private constructor(readonly dir: string) {
    this.store = new XenStore(this);
  }

  static async join(dir: string, opts: { host?: boolean; name?: string } = {}): Promise<Domain> {
    const d = new Domain(dir);
    await d.connect();
    const r = await d.request('hello', { pid: d.pid, start: d.start, host: opts.host === true, name: opts.name ?? '' }).catch((e) => {
      d.sock.destroy();
      throw e;
    });
    d.domid = Number(r.domid);
    d.memPath = String(r.mem);
    d.mem = mapFile(d.memPath, 0, FILE_BYTES, true);
    d.gnttab = new Gnttab(d);
    d.evtchn = new EvtchnPorts(d);
    return d;
  }

  private connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = net.connect(socketPath(this.dir));
      this.sock = s;
      const reader = new FrameReader();
      s.once('connect', () => resolve());
      s.on('error', (e) => {
        reject(new VtpmError('ENOENT', `no authority at ${this.dir}: ${e.message}`, { cause: e }));
      });
      s.on('data', (chunk) => {
        for (const r of reader.push(chunk)) {
          if ('error' in r) continue;
          const m = r.msg;
          if (m.ev === 'watch') {
            this.store.dispatch(String(m.token), String(m.path));
            continue;
          }
          const p = this.pending.get(Number(m.id));
          if (!p) continue;
          this.pending.delete(Number(m.id));
          if (m.ok === true) p.resolve(m);
          else p.reject(new VtpmError((m.err as VtpmErrorCode) ?? 'EPROTO', String(m.msg ?? 'authority error')));
        }
      });
      s.on('close', () => {
        this.lost = true;
        for (const p of this.pending.values()) p.reject(new VtpmError('ECLOSED', 'authority connection closed'));
        this.pending.clear();
        for (const cb of this.lostCbs.splice(0)) cb();
      });
    });
  }

  /** One request to the authority (used by gnttab, evtchn, xenstore). */
  request(op: string, args: Record<string, unknown>): Promise<Record<string, unknown>> {
    if (this.lost) return Promise.reject(new VtpmError('ECLOSED', 'authority connection closed'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      try {
        this.sock.write(encodeFrame({ v: PROTO_VERSION, id, op, ...args }));
      } catch (e) {
        this.pending.delete(id);
        reject(e);
      }
    });
  }

  onLost(cb: () => void): void {
    if (this.lost) cb();
    else this.lostCbs.push(cb);
  }

  /** Leave: close our ports, drop our mappings, disconnect (the authority reaps the rest). */
  async leave(): Promise<void> {
    if (this.lost) return;
    this.evtchn?.closeAll();
    for (const m of this.gnttab?.mappings() ?? []) await this.gnttab.unmap(m).catch(() => {});
    await new Promise<void>((r) => {
      this.onLost(r);
      this.sock.end();
    });
    // the memory mapping stays until exit: views handed out must never fault
  }
}
