// tpmif front end (the guest side, as xen-tpmfront): submit a command on the shared page,
// collect the response. A SyncTransport for the thread that attached it, plus an
// event-loop form (send) for main-thread callers. Page layout and protocol notes:
// drivers/xen/tpmif-page.ts.
import { VtpmError } from '../base/errors.ts';
import type { EvtchnEndpoint } from '../xen/evtchn.ts';
import type { Mapping } from '../base/libc.ts';
import { attachParts, MAX_TPMIF_DATA, Shared, TPMIF_CANCEL, TPMIF_FINISH, TPMIF_IDLE, TPMIF_SUBMIT, type TpmifParams } from '../xen/tpmif-page.ts';
import type { SyncTransport } from '../tpm/transport.ts';

export interface TpmifFrontOptions {
  /** Longest the blocking forms wait for a response before cancelling (default 120 s). */
  timeoutMs?: number;
  /** Before sleeping on the futex, spin this many µs for the response (a number, or asked
   *  per command: SpinGovernor.next). Default 0. */
  spinUs?: number | (() => number);
  /** Blocking forms return a view into one buffer reused per command (no allocation per
   *  command) instead of a fresh copy: for a caller done with a response before the next. */
  reuseResponse?: boolean;
}

export class TpmifFront implements SyncTransport {
  private readonly s: Shared;
  private readonly timeoutMs: number;
  private readonly spinUs: () => number;
  private readonly rsp: Uint8Array | null;
  private inFlight = false;
  private cancelled = false;
  /** Bytes of the command in flight: what the page holds until it is scrubbed. */
  private sent = 0;

  /** Over already-mapped memory (the thread that did the handshake); `maps` are the
   *  mappings this object owns and releases on close. */
  constructor(page: Uint8Array, extra: Uint8Array, ev: EvtchnEndpoint, maps: Mapping[] = [], opts: TpmifFrontOptions = {}) {
    this.s = new Shared(page, extra, ev, maps);
    this.timeoutMs = opts.timeoutMs ?? 120_000;
    const spin = opts.spinUs ?? 0;
    this.spinUs = typeof spin === 'function' ? spin : () => spin;
    this.rsp = opts.reuseResponse ? new Uint8Array(MAX_TPMIF_DATA) : null;
  }
  /** From plain parameters (any thread). */
  static attach(p: TpmifParams, opts: TpmifFrontOptions = {}): TpmifFront {
    const [page, extra, ev, maps] = attachParts(p);
    return new TpmifFront(page, extra, ev, maps, opts);
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
    this.sent = cmd.length;
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

  /** Is the answer there? Returns the response (into `into` when given, else a copy),
   *  throws ECANCELED or EIO, or null to keep waiting. */
  private collect(into: Uint8Array | null): Uint8Array | null {
    const st = this.s.state;
    if (st === TPMIF_FINISH) {
      this.inFlight = false;
      const n = this.s.length();
      const out = into ?? new Uint8Array(n);
      this.s.readInto(out, n);
      this.s.scrub(Math.max(n, this.sent)); // copied out: the page keeps no command or response bytes
      return out.subarray(0, n);
    }
    if (st === TPMIF_IDLE) {
      this.inFlight = false;
      this.s.scrub(this.sent);
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

  transmitSync(cmd: Uint8Array, locality: number): Uint8Array {
    this.begin(cmd, locality);
    return this.finish();
  }

  /** First half of transmitSync: put the command on the page and notify; returns at once,
   *  so the caller can do other work (answer its client's write) while the back end runs it. */
  begin(cmd: Uint8Array, locality: number): void {
    this.reclaim();
    this.submit(cmd, locality);
  }

  /** Second half: block until the response of the command begun is in (timeout → the
   *  command is cancelled and ETIMEDOUT thrown; channel closed → ECLOSED). */
  finish(): Uint8Array {
    if (!this.inFlight) throw new VtpmError('EINVAL', 'no command in flight');
    const deadline = performance.now() + this.timeoutMs;
    const spinUs = this.spinUs();
    if (spinUs > 0) this.spinForResponse(spinUs);
    for (;;) {
      const r = this.collect(this.rsp);
      if (r) return r;
      const left = deadline - performance.now();
      if (left <= 0) this.timedOut(this.timeoutMs);
      try {
        this.s.ev.waitSync(left); // spun already
      } catch (e) {
        const r2 = this.afterFailedWait(e, this.rsp);
        if (r2) return r2;
      }
    }
  }

  /** Event-loop form (main-thread callers): always a fresh copy of the response. */
  async send(cmd: Uint8Array, locality = 0, timeoutMs = this.timeoutMs): Promise<Uint8Array> {
    this.begin(cmd, locality);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const r = this.collect(null);
      if (r) return r;
      const left = deadline - performance.now();
      if (left <= 0) this.timedOut(timeoutMs);
      try {
        await this.s.ev.wait(left);
      } catch (e) {
        const r2 = this.afterFailedWait(e, null);
        if (r2) return r2;
      }
    }
  }

  /** An event-channel wait threw: a wait slice timing out means wait again (null); else the
   *  response if it landed meanwhile, or the error (the command is no longer in flight). */
  private afterFailedWait(e: unknown, into: Uint8Array | null): Uint8Array | null {
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

  /** Unmap what attach() mapped (does not close the channel). */
  close(): void {
    this.s.detach();
  }
}
