// tpmif front end (the guest side): submit a command, collect the response. See drivers/xen/tpmif-page.ts.
import { VtpmError } from '../base/errors.ts';
import type { EvtchnEndpoint } from '../xen/evtchn.ts';
import type { Mapping } from '../base/libc.ts';
import { attachParts, MAX_TPMIF_DATA, Shared, TPMIF_CANCEL, TPMIF_FINISH, TPMIF_IDLE, TPMIF_SUBMIT, type TpmifParams } from '../xen/tpmif-page.ts';

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

