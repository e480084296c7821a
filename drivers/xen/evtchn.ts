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
//
// In a worker_thread: `EvtchnEndpoint.attach(params)` with the EvtchnParams obtained from
// `domain.evtchn.params(port)` in the thread that owns the Domain (postMessage it, or pass
// it in workerData). The endpoint maps only the page holding the channel record; it needs
// no authority connection and no event loop. notify()/waitSync() allocate nothing.
//
// Failure detection while waiting: a closed port sets the waiter's pending word to
// PEND_CLOSED and wakes it; a dead peer is caught either by the authority (it closes every
// channel of a domain whose connection drops) or by the waiter itself: futex waits run in
// slices of at most SLICE_MS, after which the peer's pid + start time are checked in /proc.
// An idle waiter therefore wakes every SLICE_MS (the /proc read and, for event-loop
// waits, a turn of the loop: ~1 ms of CPU per wake-up on a 2-core VM) and otherwise sleeps
// in the kernel (no spinning unless spinUs is given). The slice is only the fallback for a
// peer dying with no authority left to close its channels, so it is long.

import { VtpmError } from '../base/errors.ts';
import {
  EVT_CLOSED, EVT_CONNECTED, EVT_FREE, EVT_RECORDS, EVT_UNBOUND, EW_PID, EW_RELEASED,
  EW_SIDE, EW_START, EW_STATE, EW_INTR, PAGE, PEND_CLOSED, PEND_NONE, PEND_SET, PEND_SLEEP, evtRecordOffset, EVT_RECORD_BYTES,
} from './layout.ts';
import { EAGAIN, ETIMEDOUT, futexWait, futexWaitAsync, futexWake, mapFile, processAlive, setTimespec, timespec, type Mapping } from '../base/libc.ts';

export const SLICE_MS = 2000;

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
  private readonly ts = timespec(SLICE_MS);
  private readonly tsAsync = timespec(SLICE_MS);
  private mapping: Mapping | null;
  readonly params: EvtchnParams;

  private constructor(mapping: Mapping, offsetInMapping: number, params: EvtchnParams, owned: boolean) {
    this.mapping = owned ? mapping : null;
    this.params = params;
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
  get closed(): boolean {
    return this.state === EVT_CLOSED || this.state === EVT_FREE;
  }

  /** Send an event to the peer. Throws ECLOSED if the channel is closed. */
  notify(): void {
    const w = this.w;
    const s = Atomics.load(w, this.base + EW_STATE);
    if (s !== EVT_CONNECTED) throw new VtpmError('ECLOSED', s === EVT_UNBOUND ? 'event channel not bound yet' : 'event channel closed');
    for (;;) {
      const old = Atomics.load(w, this.peer);
      if (old === PEND_SET) return;
      if (old === PEND_CLOSED) throw new VtpmError('ECLOSED', 'event channel closed');
      if (Atomics.compareExchange(w, this.peer, old, PEND_SET) === old) {
        if (old === PEND_SLEEP) futexWake(this.peerAddr, 1);
        return;
      }
    }
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

  private peerGone(): boolean {
    if (Atomics.load(this.w, this.base + EW_STATE) !== EVT_CONNECTED) return false;
    const pid = Atomics.load(this.w, this.peer + EW_PID);
    const start = Atomics.load(this.w, this.peer + EW_START);
    return pid > 0 && !processAlive(pid, start);
  }

  /**
   * Block until one event arrives (consuming it). Throws ETIMEDOUT after `timeoutMs`
   * (Infinity = no limit), ECLOSED if the channel closes or the peer process dies.
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
    let sliced = SLICE_MS;
    for (;;) {
      if (Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
      this.checkOpen();
      this.checkIntr();
      // announce that we sleep; if an event lands in between, the CAS fails and we loop
      const o = Atomics.compareExchange(w, mine, PEND_NONE, PEND_SLEEP);
      if (o !== PEND_NONE && o !== PEND_SLEEP) continue;
      const left = deadline - performance.now();
      const slice = left < SLICE_MS ? Math.max(0, left) : SLICE_MS;
      if (slice !== sliced) {
        setTimespec(this.ts, slice);
        sliced = slice;
      }
      const r = futexWait(this.mineAddr, PEND_SLEEP, this.ts);
      if (r === 0 || r === EAGAIN) continue;
      // timed out (or EINTR): drop our sleep mark unless an event replaced it
      Atomics.compareExchange(w, mine, PEND_SLEEP, PEND_NONE);
      if (r === ETIMEDOUT) {
        if (performance.now() >= deadline) {
          if (Atomics.compareExchange(w, mine, PEND_SET, PEND_NONE) === PEND_SET) return;
          this.checkOpen();
          throw new VtpmError('ETIMEDOUT', `no event within ${timeoutMs} ms`);
        }
        if (this.peerGone()) throw new VtpmError('ECLOSED', 'event channel peer process died');
      }
    }
  }

  /** Event-loop form of waitSync: the futex wait runs on a koffi async thread. */
  wait(timeoutMs = Infinity): Promise<void> {
    const deadline = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    return new Promise<void>((resolve, reject) => {
      const step = (): void => {
        try {
          if (Atomics.compareExchange(this.w, this.mine, PEND_SET, PEND_NONE) === PEND_SET) return resolve();
          this.checkOpen();
          this.checkIntr();
          if (performance.now() >= deadline) return reject(new VtpmError('ETIMEDOUT', `no event within ${timeoutMs} ms`));
          if (this.peerGone()) return reject(new VtpmError('ECLOSED', 'event channel peer process died'));
          const o = Atomics.compareExchange(this.w, this.mine, PEND_NONE, PEND_SLEEP);
          if (o !== PEND_NONE && o !== PEND_SLEEP) {
            setImmediate(step);
            return;
          }
          const left = deadline - performance.now();
          setTimespec(this.tsAsync, left < SLICE_MS ? Math.max(0, left) : SLICE_MS);
          futexWaitAsync(this.mineAddr, PEND_SLEEP, this.tsAsync, (r) => {
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

  /** Close the channel: both sides' waiters wake with ECLOSED. Idempotent. */
  close(): void {
    const w = this.w;
    const s = Atomics.load(w, this.base + EW_STATE);
    if (s === EVT_CONNECTED || s === EVT_UNBOUND) Atomics.compareExchange(w, this.base + EW_STATE, s, EVT_CLOSED);
    Atomics.store(w, this.mine, PEND_CLOSED);
    futexWake(this.mineAddr, 8);
    Atomics.store(w, this.peer, PEND_CLOSED);
    futexWake(this.peerAddr, 8);
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
