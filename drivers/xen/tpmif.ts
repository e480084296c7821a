// tpmif v2: the vTPM shared-page protocol (Xen include/public/io/tpmif.h), both sides.
//
// Page layout (little-endian): u32 length @0, u8 state @4 (0 IDLE, 1 SUBMIT, 2 FINISH,
// 3 CANCEL), u8 locality @5, u8 pad @6, u8 nr_extra_pages @7, u32 extra_pages[] @8, data
// at 8 + 4*nr_extra_pages. The front writes only SUBMIT/CANCEL, the back only IDLE/FINISH.
// This implementation always grants one extra page (nr_extra_pages = 1): data is 4084
// bytes in the first page and continues in the extra page; commands and responses are
// limited to MAX_TPMIF_DATA = 4096 bytes (EOVERSIZE beyond).
//
// Construction from plain, serialisable parameters (what a worker_thread gets):
//   const p: TpmifParams = xenbusFront.params   // or xenbusBack.params, or tpmifParams(...)
//   new Worker(file, { workerData: p })
//   // in the worker:
//   const front = TpmifFront.attach(workerData)   // maps the page(s) and the channel record
//   const rsp = front.sendSync(cmd, locality, timeoutMs)   // blocks on the futex
//   // or, in vtpmd's engine worker:
//   const back = TpmifBack.attach(workerData)
//   back.serveSync((cmd, locality) => engine.process(cmd))  // returns 'stopped' | 'closed'
//   // from any other thread: TpmifBack.stopFrom(p) (or back.stop() from an async caller)
// TpmifParams = { page: GrantParams, extra: GrantParams, evtchn: EvtchnParams } (see
// gnttab.ts / evtchn.ts): file path + byte offset of each page, channel record + side.
//
// Front: sendSync(cmd, locality, timeoutMs) → response (blocking, no event loop, allocates
// only the response), or split as begin(cmd, locality) + finishSync(timeoutMs) so the caller
// works while the back end runs the command; send(...) → Promise (event-loop form); cancel() (any thread, or
// from the main thread while send() is pending): the back aborts if it can; the pending
// call then gets the response (back finished anyway) or ECANCELED. A second submit while
// one is in flight → EBUSY. Timeout → ETIMEDOUT (the command is cancelled; the page is
// reusable once the back end acknowledges). Channel closed or back end dead → ECLOSED.
// The back end answering IDLE without a cancel (its handler threw) → EIO.
// Back: serveSync(handler) hands each command to the handler as a view over the shared page
// (a copy only when it spans the extra page) and writes the handler's response back.

import { VtpmError } from '../tpm/errors.ts';
import { EvtchnEndpoint, type EvtchnParams } from './evtchn.ts';
import { attachGrant, type GrantParams } from './gnttab.ts';
import { PAGE } from './layout.ts';
import type { Mapping } from './sys.ts';

export const TPMIF_IDLE = 0, TPMIF_SUBMIT = 1, TPMIF_FINISH = 2, TPMIF_CANCEL = 3;
export const MAX_TPMIF_DATA = 4096;
const NR_EXTRA = 1;
const DATA_OFF = 8 + 4 * NR_EXTRA;
const FIRST_CAP = PAGE - DATA_OFF; // 4084

export interface TpmifParams {
  page: GrantParams;
  extra: GrantParams;
  evtchn: EvtchnParams;
}

/** Initialise a fresh shared page (front end, before granting it). */
export function initTpmifPage(page: Uint8Array, extraRef: number): void {
  const dv = new DataView(page.buffer, page.byteOffset, PAGE);
  page.fill(0, 0, DATA_OFF);
  dv.setUint8(7, NR_EXTRA);
  dv.setUint32(8, extraRef, true);
}

/** Extra-page grant ref published in a shared page's header (back end, after mapping). */
export function tpmifExtraRef(page: Uint8Array): number {
  const dv = new DataView(page.buffer, page.byteOffset, PAGE);
  const n = dv.getUint8(7);
  if (n < 1) throw new VtpmError('EPROTO', 'tpmif page has no extra page');
  return dv.getUint32(8, true);
}

class Shared {
  readonly u8: Uint8Array; // page 0 (Uint8Array over the mapping)
  readonly x8: Uint8Array; // extra page
  readonly dv: DataView;
  constructor(page: Uint8Array, extra: Uint8Array, readonly ev: EvtchnEndpoint, readonly maps: Mapping[]) {
    this.u8 = new Uint8Array(page.buffer, page.byteOffset, PAGE);
    this.x8 = new Uint8Array(extra.buffer, extra.byteOffset, PAGE);
    this.dv = new DataView(page.buffer, page.byteOffset, PAGE);
    if (this.u8[7] !== NR_EXTRA) throw new VtpmError('EPROTO', `tpmif page announces ${this.u8[7]} extra pages, expected ${NR_EXTRA}`);
  }
  get state(): number {
    return Atomics.load(this.u8, 4);
  }
  set state(s: number) {
    Atomics.store(this.u8, 4, s);
  }
  write(data: Uint8Array): void {
    const n = data.length;
    if (n > MAX_TPMIF_DATA) throw new VtpmError('EOVERSIZE', `${n} bytes exceed the tpmif limit of ${MAX_TPMIF_DATA}`);
    if (n <= FIRST_CAP) this.u8.set(data, DATA_OFF);
    else {
      this.u8.set(data.subarray(0, FIRST_CAP), DATA_OFF);
      this.x8.set(data.subarray(FIRST_CAP), 0);
    }
    this.dv.setUint32(0, n, true);
  }
  length(): number {
    const n = this.dv.getUint32(0, true);
    if (n > MAX_TPMIF_DATA) throw new VtpmError('EPROTO', `tpmif length ${n} exceeds ${MAX_TPMIF_DATA}`);
    return n;
  }
  /** copy of the data area */
  read(): Uint8Array {
    const n = this.length();
    const out = new Uint8Array(n);
    this.readInto(out, n);
    return out;
  }
  readInto(out: Uint8Array, n: number): void {
    if (n <= FIRST_CAP) out.set(this.u8.subarray(DATA_OFF, DATA_OFF + n));
    else {
      out.set(this.u8.subarray(DATA_OFF, PAGE), 0);
      out.set(this.x8.subarray(0, n - FIRST_CAP), FIRST_CAP);
    }
  }
  /** view when it fits the first page, else a copy into `scratch` */
  view(scratch: Uint8Array): Uint8Array {
    const n = this.length();
    if (n <= FIRST_CAP) return this.u8.subarray(DATA_OFF, DATA_OFF + n);
    this.readInto(scratch, n);
    return scratch.subarray(0, n);
  }
  detach(): void {
    for (const m of this.maps) m.unmap();
    this.ev.detach();
  }
}

/** Map the page(s) and the channel record named by plain parameters (any thread). */
function attachParts(p: TpmifParams): [Uint8Array, Uint8Array, EvtchnEndpoint, Mapping[]] {
  if (!p || !p.page || !p.extra || !p.evtchn) throw new VtpmError('EINVAL', 'bad tpmif parameters');
  const a = attachGrant(p.page);
  const b = attachGrant(p.extra);
  const ev = EvtchnEndpoint.attach(p.evtchn);
  return [a.buf, b.buf, ev, [a.mapping, b.mapping]];
}

export class TpmifFront {
  private readonly s: Shared;
  private inFlight = false;
  private cancelled = false;

  /** Over already-mapped memory (the thread that did the handshake); `maps` are the
   *  mappings this object owns and releases on detach. */
  constructor(page: Uint8Array, extra: Uint8Array, ev: EvtchnEndpoint, maps: Mapping[] = []) {
    this.s = new Shared(page, extra, ev, maps);
  }
  /** From plain parameters (any thread). */
  static attach(p: TpmifParams): TpmifFront {
    return new TpmifFront(...attachParts(p));
  }

  get busy(): boolean {
    return this.inFlight;
  }

  private submit(cmd: Uint8Array, locality: number): void {
    if (this.inFlight) throw new VtpmError('EBUSY', 'a command is already in flight');
    const st = this.s.state;
    if (st === TPMIF_SUBMIT || st === TPMIF_CANCEL) throw new VtpmError('EBUSY', 'the shared page still holds a command in flight');
    if (cmd.length > MAX_TPMIF_DATA) throw new VtpmError('EOVERSIZE', `command of ${cmd.length} bytes exceeds ${MAX_TPMIF_DATA}`);
    if (cmd.length === 0) throw new VtpmError('EINVAL', 'empty command');
    if (!Number.isInteger(locality) || locality < 0 || locality > 4) throw new VtpmError('EINVAL', `bad locality ${locality}`);
    if (this.s.ev.closed) throw new VtpmError('ECLOSED', 'tpmif channel closed');
    this.s.write(cmd);
    this.s.u8[5] = locality;
    this.cancelled = false;
    this.inFlight = true;
    this.s.state = TPMIF_SUBMIT;
    try {
      this.s.ev.notify();
    } catch (e) {
      this.inFlight = false;
      throw e;
    }
  }

  /** Is the answer there? Returns the response, throws ECANCELED, or null to keep waiting. */
  private collect(into?: Uint8Array): Uint8Array | null {
    const st = this.s.state;
    if (st === TPMIF_FINISH) {
      this.inFlight = false;
      if (!into) return this.s.read();
      const n = this.s.length();
      this.s.readInto(into, n);
      return into.subarray(0, n);
    }
    if (st === TPMIF_IDLE) {
      this.inFlight = false;
      if (this.cancelled) throw new VtpmError('ECANCELED', 'command cancelled');
      throw new VtpmError('EIO', 'the back end dropped the command (handler failure or oversized response)');
    }
    return null;
  }

  private timedOut(timeoutMs: number): never {
    this.cancel();
    // the page stays busy until the back end acknowledges the cancel
    throw new VtpmError('ETIMEDOUT', `no tpmif response within ${timeoutMs} ms`);
  }

  /** Blocking send (worker threads). */
  sendSync(cmd: Uint8Array, locality = 0, timeoutMs = 120_000, spinUs = 0): Uint8Array {
    this.begin(cmd, locality);
    return this.finishSync(timeoutMs, spinUs);
  }

  /** First half of sendSync: put the command on the page and notify; returns at once, so
   *  the caller can do other work (answer its client's write) while the back end runs it. */
  begin(cmd: Uint8Array, locality = 0): void {
    this.reclaim();
    this.submit(cmd, locality);
  }

  /** Second half: block until the response of the command begun is in (timeout → the
   *  command is cancelled and ETIMEDOUT thrown; channel closed → ECLOSED). With `into`
   *  (≥ MAX_TPMIF_DATA bytes) the response is copied there and a view of it returned: no
   *  allocation per command for a caller that is done with one response before the next. */
  finishSync(timeoutMs = 120_000, spinUs = 0, into?: Uint8Array): Uint8Array {
    if (!this.inFlight) throw new VtpmError('EINVAL', 'no command in flight');
    if (into && into.length < MAX_TPMIF_DATA) throw new VtpmError('EINVAL', `response buffer of ${into.length} bytes is under ${MAX_TPMIF_DATA}`);
    const deadline = performance.now() + timeoutMs;
    if (spinUs > 0) this.spinForResponse(spinUs);
    for (;;) {
      const r = this.collect(into);
      if (r) return r;
      const left = deadline - performance.now();
      if (left <= 0) this.timedOut(timeoutMs);
      try {
        this.s.ev.waitSync(left); // spun already
      } catch (e) {
        const r2 = this.afterFailedWait(e, into);
        if (r2) return r2;
      }
    }
  }

  /** An event-channel wait threw: a wait slice timing out means wait again (null); else the
   *  response if it landed meanwhile, or the error (the command is no longer in flight). */
  private afterFailedWait(e: unknown, into?: Uint8Array): Uint8Array | null {
    if (e instanceof VtpmError && e.code === 'ETIMEDOUT') return null;
    const r = this.collect(into);
    if (r) return r;
    this.inFlight = false;
    throw e;
  }

  /** Spin (at most spinUs) for the response: most commands take a few µs, far less than
   *  a futex sleep and wake-up (and the back end then answers without a wake syscall). */
  private spinForResponse(spinUs: number): void {
    const until = performance.now() + spinUs / 1000;
    do {
      for (let i = 0; i < 32; i++) if (this.s.state !== TPMIF_SUBMIT) return;
    } while (performance.now() < until);
  }

  /** Event-loop send (main-thread callers). */
  async send(cmd: Uint8Array, locality = 0, timeoutMs = 120_000): Promise<Uint8Array> {
    this.reclaim();
    this.submit(cmd, locality);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const r = this.collect();
      if (r) return r;
      const left = deadline - performance.now();
      if (left <= 0) this.timedOut(timeoutMs);
      try {
        await this.s.ev.wait(left);
      } catch (e) {
        const r2 = this.afterFailedWait(e);
        if (r2) return r2;
      }
    }
  }

  /** After a timeout the page may still be busy: reclaim it once the back end answered. */
  private reclaim(): void {
    if (this.inFlight || this.cancelled) {
      const st = this.s.state;
      if (st === TPMIF_FINISH || st === TPMIF_IDLE) {
        this.inFlight = false;
        this.cancelled = false;
      }
    }
  }

  /** Ask the back end to abandon the command in flight (no-op when idle). */
  cancel(): void {
    const st = this.s.state;
    if (st !== TPMIF_SUBMIT) return;
    this.cancelled = true;
    this.s.state = TPMIF_CANCEL;
    try {
      this.s.ev.notify();
    } catch {
      /* closed: the waiter learns it */
    }
  }

  get evtchn(): EvtchnEndpoint {
    return this.s.ev;
  }
  /** Unmap what attach() mapped (does not close the channel). */
  detach(): void {
    this.s.detach();
  }
}

/** How a serve loop ends when its event-channel wait throws: interrupted by stop(), or closed. */
function waitEnded(e: unknown): 'stopped' | 'closed' {
  return e instanceof VtpmError && e.code === 'ECANCELED' ? 'stopped' : 'closed';
}

export type TpmifHandler = (cmd: Uint8Array, locality: number) => Uint8Array;

export class TpmifBack {
  private readonly s: Shared;
  private readonly scratch = new Uint8Array(MAX_TPMIF_DATA);
  private stopping = false;

  constructor(page: Uint8Array, extra: Uint8Array, ev: EvtchnEndpoint, maps: Mapping[] = []) {
    this.s = new Shared(page, extra, ev, maps);
  }
  static attach(p: TpmifParams): TpmifBack {
    return new TpmifBack(...attachParts(p));
  }

  /** Stop a serveSync running in another thread (it returns 'stopped'). */
  static stopFrom(p: TpmifParams): void {
    const ev = EvtchnEndpoint.attach(p.evtchn);
    try {
      ev.interrupt();
    } finally {
      ev.detach();
    }
  }

  /** Handle whatever is on the page now. Returns true if a command was handled. */
  private handleOne(handler: TpmifHandler | null, response?: Uint8Array): boolean {
    const st = this.s.state;
    if (st === TPMIF_CANCEL) {
      this.s.state = TPMIF_IDLE;
      this.s.ev.notify();
      return false;
    }
    if (st !== TPMIF_SUBMIT) return false;
    let rsp: Uint8Array;
    if (response) rsp = response;
    else {
      const cmd = this.s.view(this.scratch);
      rsp = handler!(cmd, this.s.u8[5]!);
    }
    if (this.s.state === TPMIF_CANCEL) {
      // cancelled while running: the front asked to drop it
      this.s.state = TPMIF_IDLE;
      this.s.ev.notify();
      return true;
    }
    if (rsp.length > MAX_TPMIF_DATA) {
      this.s.dv.setUint32(0, 0, true);
      this.s.state = TPMIF_IDLE;
    } else {
      this.s.write(rsp);
      this.s.state = TPMIF_FINISH;
    }
    this.s.ev.notify();
    return true;
  }

  /** After a failed command: answer an empty IDLE so the front is not left waiting.
   *  False when the channel is gone (the serve loop ends 'closed'). */
  private answerFailed(e: unknown): boolean {
    if (e instanceof VtpmError && e.code === 'ECLOSED') return false;
    try {
      this.s.dv.setUint32(0, 0, true);
      this.s.state = TPMIF_IDLE;
      this.s.ev.notify();
      return true;
    } catch {
      return false;
    }
  }

  /** Blocking serve loop (worker threads). Returns 'stopped' after stop()/stopFrom(),
   *  'closed' when the channel closes or the front end dies. Handler exceptions are
   *  answered with an empty IDLE (the front gets ECANCELED) and the loop goes on. */
  serveSync(handler: TpmifHandler, spinUs = 0): 'stopped' | 'closed' {
    for (;;) {
      try {
        this.handleOne(handler);
      } catch (e) {
        if (!this.answerFailed(e)) return 'closed';
      }
      if (this.stopping) return 'stopped';
      try {
        this.s.ev.waitSync(Infinity, spinUs);
      } catch (e) {
        return waitEnded(e);
      }
    }
  }

  /** Event-loop serve (main-thread back ends); the handler may be async. Resolves like serveSync. */
  async serve(handler: (cmd: Uint8Array, locality: number) => Uint8Array | Promise<Uint8Array>): Promise<'stopped' | 'closed'> {
    for (;;) {
      try {
        if (this.s.state === TPMIF_SUBMIT) {
          const rsp = await handler(this.s.read(), this.s.u8[5]!);
          this.handleOne(null, rsp);
        } else this.handleOne(null);
      } catch (e) {
        if (!this.answerFailed(e)) return 'closed';
      }
      if (this.stopping) return 'stopped';
      try {
        await this.s.ev.wait(Infinity);
      } catch (e) {
        return waitEnded(e);
      }
    }
  }

  /** Stop serve()/serveSync() of this object (same thread: the async serve). */
  stop(): void {
    this.stopping = true;
    this.s.ev.interrupt();
  }

  get evtchn(): EvtchnEndpoint {
    return this.s.ev;
  }
  detach(): void {
    this.s.detach();
  }
}
