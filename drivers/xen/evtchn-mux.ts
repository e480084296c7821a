// One thread waiting for many event-channel ports: Xen's 2-level ABI (xen/common/event_2l.c,
// Linux drivers/xen/events/events_2l.c). Each domain file has a pending bitmap and a mask
// bitmap indexed by port, and vcpu slots with an upcall word and a selector (layout.ts). A
// mux claims one vcpu slot in the file of each domain whose ports it waits for and routes
// those ports' events there: a notify sets the port's pending bit, then (unless masked) the
// selector bit of its word, then the upcall word, and FUTEX_WAKEs only a sleeping mux.
// Many domains: one futex_waitv(2) on their upcall words (up to 128 domains per mux).
//
//   const mux = new EvtchnMux();              // any thread; no event loop needed
//   const slot = mux.add(params)              // EvtchnParams of OUR side (domain.evtchn.params)
//   mux.endpoint(slot).notify()               // notify stays on the endpoint
//   const n = mux.waitAny(timeoutMs)          // → n ready slots in mux.ready[0..n); 0: timeout
//   await mux.waitAnyAsync(timeoutMs)         // event-loop form (one koffi async wait; one domain)
//   mux.mask(slot) / mux.unmask(slot)         // a masked port raises nothing; unmask delivers
//   mux.remove(slot); mux.close()             // routes ports back to their pending words
//   EvtchnMux.interruptFrom(params)           // any thread: that mux's waitAny throws ECANCELED
//
// One notify → one readiness report; notifies before the mux looks coalesce (as in Xen).
// A port closed (or whose peer process died: its channels are closed by the peer watch or
// the authority) makes waitAny throw EvtchnClosedError (code ECLOSED, with its slot), once,
// and leaves the mux; the caller closes or releases the endpoint. waitAny allocates nothing.
import { VtpmError } from '../base/errors.ts';
import { EAGAIN, futexWait, futexWaitAsync, procStartTime, processAlive, setTimespec, timespec } from '../base/libc.ts';
import { absDeadline, FUTEX_WAITV_BYTES, FUTEX_WAITV_MAX, futexWaitv, setWaitv } from '../base/libc-wait.ts';
import { EvtchnEndpoint, type EvtchnParams } from './evtchn.ts';
import { kickVcpu, mapArea, raisePort, type EventArea } from './evtchn-2l.ts';
import { EVT_RECORDS, HDR_MASK, HDR_PENDING, MUX_VCPUS, UPCALL_NONE, UPCALL_SLEEP, V_OWNER, V_PID, V_SEL, V_START, V_STOP, V_UPCALL, vcpuWord } from './layout.ts';

const WORDS = EVT_RECORDS / 32;
const MAX_SLOTS = 4096;

/** waitAny's report of a closed port (`slot` has left the mux). */
export class EvtchnClosedError extends VtpmError {
  constructor(readonly slot: number, port: number) {
    super('ECLOSED', `event channel of mux slot ${slot} (port ${port}) closed`);
  }
}

interface Area {
  file: string;
  a: EventArea;
  v: number; // our vcpu slot in that file
  upcall: bigint; // address of our upcall word
  mine: Int32Array; // ports of ours, bitmap
  slotOf: Int32Array; // port → slot
  count: number;
}

const pid = process.pid;
const start = procStartTime(pid);

export class EvtchnMux {
  /** Slots with an event, filled by waitAny (its first n entries). */
  readonly ready = new Int32Array(MAX_SLOTS);
  private readonly eps: (EvtchnEndpoint | null)[] = [];
  private readonly slotArea: (Area | null)[] = [];
  private readonly slotPort = new Int32Array(MAX_SLOTS);
  private readonly areas: Area[] = [];
  private readonly closedQ = new Int32Array(MAX_SLOTS); // closed slots not yet reported
  private closedN = 0;
  private readonly waitv = Buffer.alloc(FUTEX_WAITV_MAX * FUTEX_WAITV_BYTES);
  private readonly deadline = Buffer.alloc(16);
  private readonly ts = timespec(0);

  /** Route the port described by `p` (our side of it) to this mux; returns its slot. */
  add(p: EvtchnParams): number {
    const ep = EvtchnEndpoint.attach(p);
    try {
      const file = ep.areaFile(p.side);
      const area = this.areas.find((x) => x.file === file) ?? this.claim(file);
      const port = ep.portOf(p.side);
      if (port <= 0 || port >= EVT_RECORDS) throw new VtpmError('EINVAL', `port ${port} out of range`);
      let slot = this.eps.indexOf(null);
      if (slot < 0) slot = this.eps.length;
      if (slot >= MAX_SLOTS) throw new VtpmError('EBUSY', `a mux serves at most ${MAX_SLOTS} ports`);
      this.eps[slot] = ep;
      this.slotArea[slot] = area;
      this.slotPort[slot] = port;
      area.mine[port >>> 5]! |= 1 << (port & 31);
      area.slotOf[port] = slot;
      area.count++;
      ep.route(area.v);
      // closed before it was routed here: no close will raise it, so we do
      if (ep.closedForMe) raisePort(area.a, port, area.v);
      // an event raised before we looked (or while masked) must reach the selector
      this.resync(area, port);
      return slot;
    } catch (e) {
      ep.detach();
      throw e;
    }
  }

  endpoint(slot: number): EvtchnEndpoint {
    const ep = this.eps[slot];
    if (!ep) throw new VtpmError('ENOENT', `no mux slot ${slot}`);
    return ep;
  }

  /** Stop delivering `slot`: its port goes back to its own pending word. */
  remove(slot: number): void {
    const ep = this.endpoint(slot);
    // A close found by a scan but not reported yet goes with it: reporting it later would
    // name a slot the caller removed (or has since been given to another port).
    for (let i = 0; i < this.closedN; i++) {
      if (this.closedQ[i] === slot) {
        this.closedQ[i] = this.closedQ[--this.closedN]!;
        break;
      }
    }
    const area = this.slotArea[slot]!;
    const port = this.slotPort[slot]!;
    ep.route(-1);
    area.mine[port >>> 5]! &= ~(1 << (port & 31));
    area.slotOf[port] = -1;
    this.eps[slot] = null;
    this.slotArea[slot] = null;
    ep.detach();
    if (--area.count === 0) this.release(area);
  }

  mask(slot: number): void {
    this.endpoint(slot);
    const area = this.slotArea[slot]!;
    const port = this.slotPort[slot]!;
    Atomics.or(area.a.h, HDR_MASK + (port >>> 5), 1 << (port & 31));
  }

  /** Xen's unmask: clear the mask bit; a port pending meanwhile is delivered now. */
  unmask(slot: number): void {
    this.endpoint(slot);
    const area = this.slotArea[slot]!;
    const port = this.slotPort[slot]!;
    Atomics.and(area.a.h, HDR_MASK + (port >>> 5), ~(1 << (port & 31)));
    this.resync(area, port);
  }

  /** Block until ports have events (n > 0, slots in ready[0..n)) or `timeoutMs` passes (0).
   *  Throws EvtchnClosedError for a closed port, ECANCELED after interruptFrom(). */
  waitAny(timeoutMs = Infinity): number {
    const until = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    let dl = false;
    for (;;) {
      const n = this.scan();
      if (n > 0) return n;
      if (this.areas.length === 0) return 0; // nothing routed here: nothing can come
      const left = until - performance.now();
      if (left <= 0) return 0;
      if (!this.arm()) continue;
      if (this.areas.length === 1) {
        const a = this.areas[0]!;
        if (until !== Infinity) setTimespec(this.ts, left);
        const r = futexWait(a.upcall, UPCALL_SLEEP, until === Infinity ? null : this.ts);
        if (r !== 0 && r !== EAGAIN) Atomics.compareExchange(a.a.h, vcpuWord(a.v, V_UPCALL), UPCALL_SLEEP, UPCALL_NONE);
      } else {
        for (let i = 0; i < this.areas.length; i++) setWaitv(this.waitv, i, this.areas[i]!.upcall, UPCALL_SLEEP);
        if (until !== Infinity && !dl) {
          absDeadline(this.deadline, left);
          dl = true;
        }
        futexWaitv(this.waitv, this.areas.length, until === Infinity ? null : this.deadline);
      }
    }
  }

  /** Event-loop form of waitAny for a mux over one domain's ports (the futex wait runs on
   *  koffi's async worker, one for the whole mux). */
  async waitAnyAsync(timeoutMs = Infinity): Promise<number> {
    const until = timeoutMs === Infinity ? Infinity : performance.now() + timeoutMs;
    for (;;) {
      const n = this.scan();
      if (n > 0) return n;
      if (this.areas.length > 1) throw new VtpmError('EINVAL', 'waitAnyAsync serves the ports of one domain');
      const left = until - performance.now();
      if (this.areas.length === 0 || left <= 0) return 0;
      if (!this.arm()) continue;
      const a = this.areas[0]!;
      if (until !== Infinity) setTimespec(this.ts, left);
      await new Promise<void>((resolve) =>
        futexWaitAsync(a.upcall, UPCALL_SLEEP, until === Infinity ? null : this.ts, (r) => {
          if (r !== 0 && r !== EAGAIN) Atomics.compareExchange(a.a.h, vcpuWord(a.v, V_UPCALL), UPCALL_SLEEP, UPCALL_NONE);
          resolve();
        }),
      );
    }
  }

  /** Stop the mux that serves the port `p` describes (from any thread or process). */
  static interruptFrom(p: EvtchnParams): void {
    const ep = EvtchnEndpoint.attach(p);
    try {
      const v = ep.muxOf(p.side);
      if (v < 0) return;
      const a = ep.area(p.side);
      Atomics.store(a.h, vcpuWord(v, V_STOP), 1);
      kickVcpu(a, v);
    } finally {
      ep.detach();
    }
  }

  /** Route every port back and give up the vcpu slots. */
  close(): void {
    for (let s = 0; s < this.eps.length; s++) if (this.eps[s]) this.remove(s);
  }

  // ---- internals ----

  /** Clear the upcall words, then take each selector and test-and-clear our pending bits
   *  (Linux's order: a notify after the clear raises the upcall again, so none is lost). */
  private scan(): number {
    if (this.closedN > 0) return this.reportClosed();
    let n = 0;
    for (const area of this.areas) {
      const h = area.a.h;
      if (Atomics.load(h, vcpuWord(area.v, V_STOP)) !== 0) {
        Atomics.store(h, vcpuWord(area.v, V_STOP), 0);
        throw new VtpmError('ECANCELED', 'mux wait interrupted');
      }
      Atomics.store(h, vcpuWord(area.v, V_UPCALL), UPCALL_NONE);
      let sel = Atomics.exchange(h, vcpuWord(area.v, V_SEL), 0);
      while (sel !== 0) {
        const w = 31 - Math.clz32(sel & -sel);
        sel &= sel - 1;
        let bits = Atomics.load(h, HDR_PENDING + w) & ~Atomics.load(h, HDR_MASK + w) & area.mine[w]!;
        while (bits !== 0) {
          const b = 31 - Math.clz32(bits & -bits);
          bits &= bits - 1;
          const bit = 1 << b;
          if ((Atomics.and(h, HDR_PENDING + w, ~bit) & bit) === 0) continue;
          const slot = area.slotOf[w * 32 + b]!;
          if (this.eps[slot]!.closedForMe) this.closedQ[this.closedN++] = slot;
          else this.ready[n++] = slot;
        }
      }
    }
    // events first; each closed slot is reported by a waitAny of its own
    return n === 0 && this.closedN > 0 ? this.reportClosed() : n;
  }

  private reportClosed(): never {
    const slot = this.closedQ[--this.closedN]!;
    const port = this.slotPort[slot]!;
    this.remove(slot);
    throw new EvtchnClosedError(slot, port);
  }

  /** Announce that we sleep on every upcall word; false when one was raised meanwhile. */
  private arm(): boolean {
    for (const area of this.areas) {
      const u = vcpuWord(area.v, V_UPCALL);
      const o = Atomics.compareExchange(area.a.h, u, UPCALL_NONE, UPCALL_SLEEP);
      if (o !== UPCALL_NONE && o !== UPCALL_SLEEP) return false;
    }
    return true;
  }

  /** A port pending in the bitmap but not selected (raised before it was routed here, or
   *  while masked): set its selector bit and the upcall, as Xen's unmask does. */
  private resync(area: Area, port: number): void {
    const h = area.a.h;
    const bit = 1 << (port & 31);
    if ((Atomics.load(h, HDR_PENDING + (port >>> 5)) & bit) === 0 || (Atomics.load(h, HDR_MASK + (port >>> 5)) & bit) !== 0) return;
    Atomics.or(h, vcpuWord(area.v, V_SEL), 1 << (port >>> 5));
    kickVcpu(area.a, area.v);
  }

  /** A vcpu slot in `file` (a free one, or one whose owner process is gone). */
  private claim(file: string): Area {
    if (this.areas.length >= FUTEX_WAITV_MAX) throw new VtpmError('EBUSY', `a mux waits for at most ${FUTEX_WAITV_MAX} domains`);
    const a = mapArea(file);
    const h = a.h;
    for (let v = 0; v < MUX_VCPUS; v++) {
      const o = vcpuWord(v, V_OWNER);
      const free = Atomics.load(h, o) === 0 || !processAlive(Atomics.load(h, vcpuWord(v, V_PID)), Atomics.load(h, vcpuWord(v, V_START)));
      const cur = Atomics.load(h, o);
      if (!free || Atomics.compareExchange(h, o, cur, cur + 1) !== cur) continue;
      Atomics.store(h, vcpuWord(v, V_PID), pid);
      Atomics.store(h, vcpuWord(v, V_START), start);
      Atomics.store(h, vcpuWord(v, V_SEL), 0);
      Atomics.store(h, vcpuWord(v, V_STOP), 0);
      Atomics.store(h, vcpuWord(v, V_UPCALL), UPCALL_NONE);
      const area: Area = { file, a, v, upcall: a.addr + BigInt(vcpuWord(v, V_UPCALL) * 4), mine: new Int32Array(WORDS), slotOf: new Int32Array(EVT_RECORDS).fill(-1), count: 0 };
      this.areas.push(area);
      return area;
    }
    a.mapping?.unmap();
    throw new VtpmError('EBUSY', `no free mux vcpu slot in ${file}`);
  }

  private release(area: Area): void {
    const h = area.a.h;
    Atomics.store(h, vcpuWord(area.v, V_PID), 0);
    Atomics.store(h, vcpuWord(area.v, V_OWNER), 0);
    this.areas.splice(this.areas.indexOf(area), 1);
    area.a.mapping?.unmap();
  }
}
