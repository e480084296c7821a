// Event channels: interdomain port pairs whose notify is a pending word in shared memory
// plus FUTEX_WAKE, and whose wait is FUTEX_WAIT (after an optional short bounded spin).
// This file is one end of a channel (EvtchnEndpoint); a domain's port table (allocate,
// bind, close: `domain.evtchn`) is evtchn-ports.ts.
//
//   notify()         set the peer's pending word, FUTEX_WAKE if it sleeps. Never lost: a
//                    notify while the peer is busy stays pending until its next wait.
//                    Notifies while one is already pending coalesce, as in Xen.
//   waitSync(timeoutMs)  blocking form (worker threads / blocking callers)
//   wait(timeoutMs) → Promise  event-loop form (koffi async futex wait on a pool thread)
//   waitThen(cb)     the same with a callback and no timeout, for serve loops
//
// In a worker_thread: `EvtchnEndpoint.attach(params)` with the EvtchnParams obtained from
// `domain.evtchn.params(port)` in the thread that owns the Domain (postMessage it, or pass
// it in workerData). The endpoint maps only the page holding the channel record; it needs
// no authority connection and no event loop. notify()/waitSync() allocate nothing.
//
// Failure detection while waiting: a closed port sets the waiter's pending word to
// PEND_CLOSED and wakes it. A dead peer is caught by the authority (it closes every channel
// of a domain whose connection drops) and, with no authority left, by the waiter's own
// process: its Domain watches each peer process with a pidfd (evtchn-watch.ts) and closes
// that peer's channels when it exits. So a wait has no slices: an idle waiter sleeps in
// the kernel until an event, a close or a peer's death (no spinning unless spinUs is
// given, no timer).
//
// A side added to an EvtchnMux (evtchn-mux.ts) has its events raised in its domain's
// 2-level area (evtchn-2l.ts) instead of its pending word: notify() reads the peer side's
// mux word (one load on the hot path) and goes the 2-level way when it is set.

import { VtpmError } from '../base/errors.ts';
import {
  EVT_CLOSED, EVT_CONNECTED, EVT_FREE, EVT_RECORDS, EVT_UNBOUND, EW_MUX, EW_PID, EW_RELEASED, EW_START,
  EW_SIDE, EW_STATE, EW_INTR, PAGE, PEND_CLOSED, PEND_NONE, PEND_SET, PEND_SLEEP, evtRecordOffset, EVT_RECORD_BYTES,
} from './layout.ts';
import { EAGAIN, ETIMEDOUT, futexWait, futexWaitAsync, futexWake, mapFile, setTimespec, timespec, type Mapping } from '../base/libc.ts';
import { areaFileOf, mapArea, portOf, raisePort, type EventArea } from './evtchn-2l.ts';
import { HDR_PENDING as HDR_PENDING_BASE } from './layout.ts';

/** Plain, serialisable description of one end of a channel (for worker threads). */
export interface EvtchnParams {
  /** Domain file holding the channel record (the allocating domain's file). */
  path: string;
  /** Record index in that file (= the allocating domain's port number). */
  record: number;
  /** 0 = allocating side, 1 = binding side. */
  side: 0 | 1;
}

/** One end of a connected (or unbound) channel over a mapped record. */
export class EvtchnEndpoint {
  private readonly w: Int32Array;
  private readonly base: number; // i32 index of the record in w
  private readonly mine: number; // i32 index of our pending word
  private readonly peer: number; // i32 index of the peer's pending word
  private readonly mineAddr: bigint;
  private readonly peerAddr: bigint;
  private readonly ts = timespec(0);
  private readonly tsAsync = timespec(0);
  private mapping: Mapping | null;
  private readonly areas: [EventArea | null, EventArea | null] = [null, null]; // per side, mapped on first use
  readonly params: EvtchnParams;
  private readonly peerSide: 0 | 1;

  private constructor(mapping: Mapping, offsetInMapping: number, params: EvtchnParams, owned: boolean) {
    this.mapping = owned ? mapping : null;
    this.params = params;
    this.peerSide = params.side === 0 ? 1 : 0;
    this.w = new Int32Array(mapping.buffer);
    this.base = offsetInMapping / 4;
    this.mine = this.base + EW_SIDE[params.side];
    this.peer = this.base + EW_SIDE[1 - params.side];
    this.mineAddr = mapping.addr + BigInt(this.mine * 4);
    this.peerAddr = mapping.addr + BigInt(this.peer * 4);
  }

  /** Map the record described by `p` (usable in any thread). */
  static attach(p: EvtchnParams): EvtchnEndpoint {
    checkParams(p);
    const off = evtRecordOffset(p.record);
    const pageOff = off - (off % PAGE);
    const m = mapFile(p.path, pageOff, PAGE, true);
    return new EvtchnEndpoint(m, off - pageOff, p, true);
  }

  /** Endpoint over an existing mapping of the whole domain file (no new mmap). */
  static over(whole: Mapping, p: EvtchnParams): EvtchnEndpoint {
    checkParams(p);
    return new EvtchnEndpoint(whole, evtRecordOffset(p.record), p, false);
  }

  get state(): number {
    return Atomics.load(this.w, this.base + EW_STATE);
  }
  /** The peer side's process (pid 0 while nobody bound the port). */
  get peerProcess(): { pid: number; start: number } {
    return { pid: Atomics.load(this.w, this.peer + EW_PID), start: Atomics.load(this.w, this.peer + EW_START) };
  }
  get closed(): boolean {
    return this.state === EVT_CLOSED || this.state === EVT_FREE;
  }

  /** Send an event to the peer. Throws ECLOSED if the channel is closed. */
  notify(): void {
    const w = this.w;
    const s = Atomics.load(w, this.base + EW_STATE);
    if (s !== EVT_CONNECTED) throw new VtpmError('ECLOSED', s === EVT_UNBOUND ? 'event channel not bound yet' : 'event channel closed');
    const mux = Atomics.load(w, this.peer + EW_MUX);
    if (mux !== 0) return this.raise(this.peerSide, mux - 1);
    for (;;) {
      const old = Atomics.load(w, this.peer);
      if (old === PEND_SET) return;
      if (old === PEND_CLOSED) throw new VtpmError('ECLOSED', 'event channel closed');
      if (Atomics.compareExchange(w, this.peer, old, PEND_SET) === old) {
        if (old === PEND_SLEEP) futexWake(this.peerAddr, 1);
        // the peer switched to a mux meanwhile: whoever takes the word back passes it on
        else if (Atomics.load(w, this.peer + EW_MUX) !== 0) this.handOver(this.peerSide);
        return;
      }
    }
  }

  /** The 2-level area side `side` reports to (its domain's page 0), mapped once. */
  area(side: 0 | 1): EventArea {
    return (this.areas[side] ??= mapArea(areaFileOf(this.params.path, this.w, this.base, side)));
  }
  /** The domain file holding side `side`'s 2-level area. */
  areaFile(side: 0 | 1): string {
    return areaFileOf(this.params.path, this.w, this.base, side);
  }
  /** The mux vcpu side `side` is routed to, or -1. */
  muxOf(side: 0 | 1): number {
    return Atomics.load(this.w, this.base + EW_SIDE[side] + EW_MUX) - 1;
  }
  /** The port side `side` is known by in its own domain (its bit in that area). */
  portOf(side: 0 | 1): number {
    return portOf(this.w, this.base, this.params.record, side);
  }

  private raise(side: 0 | 1, v: number): void {
    if (Atomics.load(this.w, this.base + EW_SIDE[side]) === PEND_CLOSED) throw new VtpmError('ECLOSED', 'event channel closed');
    raisePort(this.area(side), this.portOf(side), v);
  }

  /** An event left in side `side`'s pending word while it is routed to a mux: move it to
   *  the 2-level area (exactly once: the CAS decides who moves it). */
  handOver(side: 0 | 1): void {
    const i = this.base + EW_SIDE[side];
    const mux = Atomics.load(this.w, this.base + EW_SIDE[side] + EW_MUX);
    if (mux !== 0 && Atomics.compareExchange(this.w, i, PEND_SET, PEND_NONE) === PEND_SET) raisePort(this.area(side), this.portOf(side), mux - 1);
  }

  /** Route OUR side's events to vcpu `v` of our domain's 2-level area (v = -1: back to the
   *  pending word). EvtchnMux calls this; nobody may waitSync on this side meanwhile. */
  route(v: number): void {
    const side = this.params.side;
    Atomics.store(this.w, this.mine + EW_MUX, v + 1);
    if (v >= 0) {
      this.handOver(side);
      return;
    }
    // back to the word: a bit still pending in the area becomes the word's event
    const a = this.area(side);
    const port = this.portOf(side);
    const bit = 1 << (port & 31);
    if ((Atomics.and(a.h, HDR_PENDING_BASE + (port >>> 5), ~bit) & bit) !== 0) Atomics.compareExchange(this.w, this.mine, PEND_NONE, PEND_SET);
  }

  /** Our side's state as a mux sees it: true once the channel is closed for us. */
  get closedForMe(): boolean {
    const s = Atomics.load(this.w, this.base + EW_STATE);
    return s === EVT_CLOSED || s === EVT_FREE || Atomics.load(this.w, this.mine) === PEND_CLOSED;
  }

  /** Make a blocked waitSync()/wait() on THIS side throw ECANCELED ("interrupted"), from
   *  any thread or process that attached the same side. Used to stop serve loops. A
   *  channel no longer connected needs no stop (its waiters end with ECLOSED by
   *  themselves), and its record may already carry the next channel: left alone. */
  interrupt(): void {
    if (Atomics.load(this.w, this.base + EW_STATE) !== EVT_CONNECTED) return;
    Atomics.store(this.w, this.base + EW_INTR + this.params.side, 1);
    const o = Atomics.compareExchange(this.w, this.mine, PEND_SLEEP, PEND_NONE);
    if (o === PEND_SLEEP) futexWake(this.mineAddr, 8);
  }

  private checkIntr(): void {
    if (Atomics.load(this.w, this.base + EW_INTR + this.params.side) !== 0) {
      Atomics.store(this.w, this.base + EW_INTR + this.params.side, 0);
      throw new VtpmError('ECANCELED', 'wait interrupted');
    }
  }

  /** Consume a pending event if there is one (never blocks). */
  poll(): boolean {
    if (Atomics.compareExchange(this.w, this.mine, PEND_SET, PEND_NONE) === PEND_SET) return true;
    this.checkOpen();
    return false;
  }

  private checkOpen(): void {
    const s = Atomics.load(this.w, this.base + EW_STATE);
    if (s === EVT_CLOSED || s === EVT_FREE || Atomics.load(this.w, this.mine) === PEND_CLOSED) {
      throw new VtpmError('ECLOSED', 'event channel closed');
    }
  }

  /**
   * Block until one event arrives (consuming it). Throws ETIMEDOUT after `timeoutMs`
   * (Infinity = no limit), ECLOSED if the channel closes or the peer process dies (its
   * channels are closed then: by the authority, or by our process's peer watch).
   * `spinUs` spins that long on the pending word before sleeping in the kernel.
   */
  waitSync(timeoutMs = Infinity, spinUs = 0): void {
    const w = this.w;
    const mine = this.mine;
    if (Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
    if (spinUs > 0) {
      const until = performance.now() + spinUs / 1000;
      do {
        for (let i = 0; i < 64; i++) {
          if (Atomics.load(w, mine) === PEND_SET && Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
        }
      } while (performance.now() < until);
    }
    const deadline = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    for (;;) {
      if (Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
      this.checkOpen();
      this.checkIntr();
      // announce that we sleep; if an event lands in between, the CAS fails and we loop
      const o = Atomics.compareExchange(w, mine, PEND_NONE, PEND_SLEEP);
      if (o !== PEND_NONE && o !== PEND_SLEEP) continue;
      let ts: Buffer | null = null;
      if (deadline !== Infinity) {
        setTimespec(this.ts, Math.max(0, deadline - performance.now()));
        ts = this.ts;
      }
      const r = futexWait(this.mineAddr, PEND_SLEEP, ts);
      if (r === 0 || r === EAGAIN) continue;
      // timed out (or EINTR): drop our sleep mark unless an event replaced it
      Atomics.compareExchange(w, mine, PEND_SLEEP, PEND_NONE);
      if (r === ETIMEDOUT && performance.now() >= deadline) {
        if (Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
        this.checkOpen();
        throw new VtpmError('ETIMEDOUT', `no event within ${timeoutMs} ms`);
      }
    }
  }

  /** Event-loop form of waitSync: the futex wait runs on a koffi async thread (which it
   *  holds while it sleeps: for long waits on many ports use EvtchnMux.waitAnyAsync). */
  wait(timeoutMs = Infinity): Promise<void> {
    const deadline = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    return new Promise<void>((resolve, reject) => {
      const step = (): void => {
        try {
          if (Atomics.compareExchange(this.w, this.mine, PEND_SET, PEND_NONE) === PEND_SET) return resolve();
          this.checkOpen();
          this.checkIntr();
          if (performance.now() >= deadline) return reject(new VtpmError('ETIMEDOUT', `no event within ${timeoutMs} ms`));
          const o = Atomics.compareExchange(this.w, this.mine, PEND_NONE, PEND_SLEEP);
          if (o !== PEND_NONE && o !== PEND_SLEEP) {
            setImmediate(step);
            return;
          }
          if (deadline !== Infinity) setTimespec(this.tsAsync, Math.max(0, deadline - performance.now()));
          futexWaitAsync(this.mineAddr, PEND_SLEEP, deadline === Infinity ? null : this.tsAsync, (r) => {
            if (r !== 0 && r !== EAGAIN) Atomics.compareExchange(this.w, this.mine, PEND_SLEEP, PEND_NONE);
            step();
          });
        } catch (e) {
          reject(e);
        }
      };
      step();
    });
  }

  /** Callback form of wait(Infinity), for a serve loop on the event loop (the isolated
   *  vtpmd's one thread): cb(null) once an event was consumed, cb(error) when the channel
   *  closes or the wait is interrupted. No promise or closure per event; one call
   *  outstanding at a time. */
  waitThen(cb: (err: unknown) => void): void {
    this.thenCb = cb;
    this.stepThen();
  }

  private thenCb: ((err: unknown) => void) | null = null;

  private readonly stepThen = (): void => {
    const cb = this.thenCb!;
    try {
      if (Atomics.compareExchange(this.w, this.mine, PEND_SET, PEND_NONE) === PEND_SET) {
        this.thenCb = null;
        return cb(null);
      }
      this.checkOpen();
      this.checkIntr();
      const o = Atomics.compareExchange(this.w, this.mine, PEND_NONE, PEND_SLEEP);
      if (o !== PEND_NONE && o !== PEND_SLEEP) {
        setImmediate(this.stepThen);
        return;
      }
      futexWaitAsync(this.mineAddr, PEND_SLEEP, null, this.afterWaitThen);
    } catch (e) {
      this.thenCb = null;
      cb(e);
    }
  };

  private readonly afterWaitThen = (r: number): void => {
    if (r !== 0 && r !== EAGAIN) Atomics.compareExchange(this.w, this.mine, PEND_SLEEP, PEND_NONE);
    this.stepThen();
  };

  /** Close the channel: both sides' waiters wake with ECLOSED. Idempotent. */
  close(): void {
    const w = this.w;
    const s = Atomics.load(w, this.base + EW_STATE);
    if (s === EVT_CONNECTED || s === EVT_UNBOUND) Atomics.compareExchange(w, this.base + EW_STATE, s, EVT_CLOSED);
    Atomics.store(w, this.mine, PEND_CLOSED);
    futexWake(this.mineAddr, 8);
    Atomics.store(w, this.peer, PEND_CLOSED);
    futexWake(this.peerAddr, 8);
    for (const side of [0, 1] as const) {
      const mux = Atomics.load(w, this.base + EW_SIDE[side] + EW_MUX);
      if (mux === 0) continue;
      let area: EventArea;
      try {
        area = this.area(side);
      } catch (e) {
        if (e instanceof VtpmError && e.code === 'ENOENT') continue; // that side's domain was reaped: no mux left to wake
        throw e;
      }
      raisePort(area, this.portOf(side), mux - 1);
    }
  }

  /** Mark our side released (after close); frees the record once both sides released
   *  (or at once for a port nobody ever bound). */
  release(): void {
    const w = this.w;
    const bit = this.params.side === 0 ? 1 : 2;
    const prev = Atomics.or(w, this.base + EW_RELEASED, bit);
    const neverBound = this.params.side === 0 && Atomics.load(w, this.peer + EW_PID) === 0;
    if ((prev | bit) === 3 || neverBound) freeRecord(w, this.base);
  }

  /** Unmap (does not close the channel). */
  detach(): void {
    this.mapping?.unmap();
    this.mapping = null;
    for (const a of this.areas) a?.mapping?.unmap();
    this.areas[0] = this.areas[1] = null;
  }
}

function checkParams(p: EvtchnParams): void {
  if (!p || typeof p.path !== 'string' || !Number.isInteger(p.record) || p.record <= 0 || p.record >= EVT_RECORDS || (p.side !== 0 && p.side !== 1)) {
    throw new VtpmError('EINVAL', `bad event-channel parameters ${JSON.stringify(p)}`);
  }
}

/** Return a channel record to the free pool (both sides released, or never bound). */
export function freeRecord(w: Int32Array, base: number): void {
  for (let i = 1; i < EVT_RECORD_BYTES / 4; i++) Atomics.store(w, base + i, 0);
  Atomics.store(w, base + EW_STATE, EVT_FREE);
}
