// A domain's event-channel ports (`domain.evtchn`): records in the domain's own file,
// offered to a remote domain and bound through the authority; each port's end is an
// EvtchnEndpoint (evtchn.ts). The authority's side of binding and closing is here too.
//
//   allocUnbound(remoteDomid) → port                 (local: writes a record in our file)
//   bindInterdomain(remoteDomid, remotePort) → port  (async: the authority checks the
//                                                      unbound port was offered to us)
//   notify(port), wait(port, ms), waitSync(port, ms)  as EvtchnEndpoint
//   on(port, handler) → off()   event-loop form for control-plane users (handler called
//                    on the JS thread per event; each listener holds one of libuv's pool
//                    threads while it waits: for many ports, EvtchnMux.waitAnyAsync)
//   close(port)      both ends' waiters wake with VtpmError ECLOSED
//   params(port) → EvtchnParams        plain serialisable description of our end
//
// Each connected port's peer process is watched (evtchn-watch.ts): when it exits, the
// channel is closed here, so its waiters wake even when no authority is left to do it.
// The peer of a port we bound is known at once (the record holds it); the peer of a port
// we offered is learnt from the authority's `bound` event (peerBound).

import { VtpmError } from '../base/errors.ts';
import { EvtchnEndpoint, freeRecord, type EvtchnParams } from './evtchn.ts';
import {
  EVT_CLOSED, EVT_CONNECTED, EVT_FREE, EVT_PROXY, EVT_RECORDS, EVT_UNBOUND, EW_INTR, EW_PID, EW_RDOM, EW_RELEASED, EW_RPORT,
  EW_MUX, EW_SIDE, EW_START, EW_STATE, HDR_DOMID, PEND_CLOSED, PEND_NONE, evtRecordOffset,
} from './layout.ts';
import { futexWake, type Mapping } from '../base/libc.ts';
import { raisePort, stopMuxesOf, type EventArea } from './evtchn-2l.ts';
import { peerWatch } from './evtchn-watch.ts';

/** What the domain-level manager needs from its owner (the Domain). */
export interface EvtchnHost {
  readonly domid: number;
  readonly memPath: string;
  readonly mem: Mapping;
  readonly pid: number;
  readonly start: number;
  request(op: string, args: Record<string, unknown>): Promise<Record<string, unknown>>;
}

// process.exit() joins the process's threads (workers, libuv's pool) and a thread blocked in
// a futex wait with no timeout would never return: at exit every waiter of this process's
// ports is interrupted (ECANCELED), as a serve loop's stop does.
const live = new Set<EvtchnPorts>();
let exitHook = false;
function interruptAll(): void {
  for (const ports of live) ports.interruptAll();
}

/** Per-domain event channels (`domain.evtchn`). */
export class EvtchnPorts {
  private readonly w: Int32Array;
  private readonly ends = new Map<number, EvtchnEndpoint>();
  private readonly remote = new Map<number, EvtchnEndpoint>(); // our proxy port → endpoint over the remote file
  private readonly listeners = new Map<number, { stop: boolean }>();
  private readonly unwatch = new Map<number, () => void>(); // port → stop watching its peer

  constructor(private readonly host: EvtchnHost) {
    this.w = new Int32Array(host.mem.buffer);
    live.add(this);
    if (!exitHook) process.once('exit', interruptAll);
    exitHook = true;
  }

  /** Interrupt every waiter of our ports (and of the muxes of this process on our area). */
  interruptAll(): void {
    for (const ep of [...this.ends.values(), ...this.remote.values()]) ep.interrupt();
    stopMuxesOf(this.w, this.host.mem.addr, this.host.pid);
  }

  private allocRecord(): number {
    for (let port = 1; port < EVT_RECORDS; port++) {
      const base = evtRecordOffset(port) / 4;
      if (Atomics.compareExchange(this.w, base + EW_STATE, EVT_FREE, EVT_PROXY) === EVT_FREE) return port;
    }
    throw new VtpmError('EBUSY', 'no free event-channel port');
  }

  /** Offer a port to `remoteDomid`; it binds with bindInterdomain(ourDomid, port). */
  allocUnbound(remoteDomid: number): number {
    if (!Number.isInteger(remoteDomid) || remoteDomid < 0 || remoteDomid > 0xffff) throw new VtpmError('EINVAL', `bad domid ${remoteDomid}`);
    const port = this.allocRecord();
    const base = evtRecordOffset(port) / 4;
    const w = this.w;
    Atomics.store(w, base + EW_RDOM, remoteDomid);
    Atomics.store(w, base + EW_RPORT, 0);
    Atomics.store(w, base + EW_RELEASED, 0);
    Atomics.store(w, base + EW_SIDE[0], PEND_NONE);
    Atomics.store(w, base + EW_SIDE[0] + EW_PID, this.host.pid);
    Atomics.store(w, base + EW_SIDE[0] + EW_START, this.host.start);
    Atomics.store(w, base + EW_SIDE[1], PEND_NONE);
    Atomics.store(w, base + EW_SIDE[1] + EW_PID, 0);
    Atomics.store(w, base + EW_SIDE[1] + EW_START, 0);
    // A stop aimed at the record's previous channel must not stop this one's waiters.
    Atomics.store(w, base + EW_INTR, 0);
    Atomics.store(w, base + EW_INTR + 1, 0);
    Atomics.store(w, base + EW_STATE, EVT_UNBOUND);
    this.ends.set(port, EvtchnEndpoint.over(this.host.mem, { path: this.host.memPath, record: port, side: 0 }));
    return port;
  }

  /** Bind to the unbound port `remotePort` that `remoteDomid` offered us. */
  async bindInterdomain(remoteDomid: number, remotePort: number): Promise<number> {
    const port = this.allocRecord();
    const base = evtRecordOffset(port) / 4;
    Atomics.store(this.w, base + EW_RDOM, remoteDomid);
    Atomics.store(this.w, base + EW_RPORT, remotePort);
    try {
      const r = await this.host.request('bind', { remoteDom: remoteDomid, remotePort, localPort: port });
      const ep = EvtchnEndpoint.attach({ path: String(r.path), record: Number(r.record), side: 1 });
      this.remote.set(port, ep);
      this.watchPeer(port, ep);
      return port;
    } catch (e) {
      freeRecord(this.w, base);
      throw e;
    }
  }

  /** The authority's word that `port` (one we offered) was bound: watch the binder. */
  peerBound(port: number): void {
    const ep = this.ends.get(port);
    if (ep && !this.unwatch.has(port) && ep.state === EVT_CONNECTED) this.watchPeer(port, ep);
  }

  private watchPeer(port: number, ep: EvtchnEndpoint): void {
    const { pid, start } = ep.peerProcess;
    if (pid <= 0 || pid === this.host.pid) return; // our own process: it cannot outlive us
    this.unwatch.set(
      port,
      peerWatch.watch(pid, start, () => {
        this.unwatch.delete(port);
        // still the same channel on this port: close it, waking its waiters with ECLOSED
        if (this.ends.get(port) === ep || this.remote.get(port) === ep) ep.close();
      }),
    );
  }

  private end(port: number): EvtchnEndpoint {
    const e = this.ends.get(port) ?? this.remote.get(port);
    if (!e) throw new VtpmError(Number.isInteger(port) && port > 0 && port < EVT_RECORDS ? 'ENOENT' : 'EINVAL', `no event-channel port ${port}`);
    return e;
  }

  /** Serialisable parameters for EvtchnEndpoint.attach in a worker thread. */
  params(port: number): EvtchnParams {
    return { ...this.end(port).params };
  }
  endpoint(port: number): EvtchnEndpoint {
    return this.end(port);
  }

  notify(port: number): void {
    this.end(port).notify();
  }
  waitSync(port: number, timeoutMs = Infinity, spinUs = 0): void {
    this.end(port).waitSync(timeoutMs, spinUs);
  }
  wait(port: number, timeoutMs = Infinity): Promise<void> {
    return this.end(port).wait(timeoutMs);
  }

  /** Call `handler` on the event loop for every event on `port` until off() or close.
   *  `onError` receives ECLOSED when the channel closes or the peer dies. */
  on(port: number, handler: () => void, onError?: (e: VtpmError) => void): () => void {
    const ep = this.end(port);
    const l = { stop: false };
    this.listeners.set(port, l);
    const loop = (): void => {
      if (l.stop) return;
      ep.wait(Infinity).then(
        () => {
          if (l.stop) return;
          try {
            handler();
          } finally {
            loop();
          }
        },
        (e: VtpmError) => {
          if (!l.stop) onError?.(e);
        },
      );
    };
    loop();
    return () => {
      l.stop = true;
    };
  }

  /** Close our port: the peer's waiters wake with ECLOSED; the port number is freed. */
  close(port: number): void {
    const ep = this.end(port);
    const l = this.listeners.get(port);
    if (l) l.stop = true;
    this.listeners.delete(port);
    this.unwatch.get(port)?.();
    this.unwatch.delete(port);
    ep.close();
    ep.release();
    if (this.remote.has(port)) {
      this.remote.delete(port);
      ep.detach();
      freeRecord(this.w, evtRecordOffset(port) / 4);
    } else {
      this.ends.delete(port);
    }
  }

  closeAll(): void {
    live.delete(this);
    for (const p of [...this.ends.keys(), ...this.remote.keys()]) {
      try {
        this.close(p);
      } catch {
        /* already gone */
      }
    }
  }
}

/** Authority side: close every channel record in `w` (a whole domain file) touching `deadDom`
 *  (or all of them when `all`), waking both ends (a side routed to a mux through its
 *  domain's 2-level area: `areaOf(domid)`, the authority's mapping of that domain's file). */
export function closeChannelsOf(w: Int32Array, addr: bigint, deadDom: number, all: boolean, areaOf: (domid: number) => EventArea | undefined): void {
  for (let port = 1; port < EVT_RECORDS; port++) {
    const base = evtRecordOffset(port) / 4;
    const s = Atomics.load(w, base + EW_STATE);
    if (s !== EVT_CONNECTED && s !== EVT_UNBOUND) continue;
    const rdom = Atomics.load(w, base + EW_RDOM);
    if (!all && rdom !== deadDom) continue;
    Atomics.store(w, base + EW_STATE, EVT_CLOSED);
    if (!all) Atomics.or(w, base + EW_RELEASED, 2); // the dead binder will never release its side
    for (let side = 0; side < 2; side++) {
      const i = base + EW_SIDE[side]!;
      Atomics.store(w, i, PEND_CLOSED);
      futexWake(addr + BigInt(i * 4), 8);
      const mux = Atomics.load(w, i + EW_MUX);
      const area = mux === 0 ? undefined : side === 0 ? areaOf(Atomics.load(w, HDR_DOMID)) : areaOf(rdom);
      if (area) raisePort(area, side === 0 ? port : Atomics.load(w, base + EW_RPORT), mux - 1);
    }
  }
}

/** Authority side: accept a bind of `(allocDom's record port)` by `binder`. */
export function acceptBind(w: Int32Array, port: number, binder: number, binderPort: number, pid: number, start: number): void {
  if (!Number.isInteger(port) || port <= 0 || port >= EVT_RECORDS) throw new VtpmError('EINVAL', `port ${port} out of range`);
  const base = evtRecordOffset(port) / 4;
  const s = Atomics.load(w, base + EW_STATE);
  if (s !== EVT_UNBOUND) throw new VtpmError(s === EVT_CONNECTED ? 'EBUSY' : 'ENOENT', `port ${port} is not an unbound port`);
  if (Atomics.load(w, base + EW_RDOM) !== binder) throw new VtpmError('EPERM', `port ${port} was not offered to domain ${binder}`);
  Atomics.store(w, base + EW_RPORT, binderPort);
  Atomics.store(w, base + EW_SIDE[1] + EW_PID, pid);
  Atomics.store(w, base + EW_SIDE[1] + EW_START, start);
  if (Atomics.compareExchange(w, base + EW_STATE, EVT_UNBOUND, EVT_CONNECTED) !== EVT_UNBOUND) throw new VtpmError('EBUSY', `port ${port} changed while binding`);
}
