// tpmif back end (vtpmd's side, as mini-os tpmback): serve the commands the front end
// submits, on the thread that attached the page. Layout and protocol: drivers/xen/tpmif-page.ts.
import { VtpmError } from '../base/errors.ts';
import { EvtchnEndpoint } from '../xen/evtchn.ts';
import type { Mapping } from '../base/libc.ts';
import { attachParts, MAX_TPMIF_DATA, Shared, TPMIF_CANCEL, TPMIF_FINISH, TPMIF_IDLE, TPMIF_SUBMIT, type TpmifParams } from '../xen/tpmif-page.ts';

/** How a serve loop ends when its event-channel wait throws: interrupted by stopFrom(), or closed. */
function waitEnded(e: unknown): 'stopped' | 'closed' {
  return e instanceof VtpmError && e.code === 'ECANCELED' ? 'stopped' : 'closed';
}

/** serveAsync: how long its thread waits for a guest's next command itself, and how long
 *  a burst of commands may keep the event loop waiting. */
const BURST_WAIT_MS = 2;
const BURST_BUDGET_MS = 20;

export type TpmifHandler = (cmd: Uint8Array, locality: number) => Uint8Array;

export class TpmifBack {
  private readonly s: Shared;
  private readonly scratch = new Uint8Array(MAX_TPMIF_DATA);

  private constructor(page: Uint8Array, extra: Uint8Array, ev: EvtchnEndpoint, maps: Mapping[]) {
    this.s = new Shared(page, extra, ev, maps);
  }
  /** From plain parameters, in the thread that serves (any thread). */
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

  /** Handle whatever is on the page now. */
  private handleOne(handler: TpmifHandler): void {
    const st = this.s.state;
    if (st === TPMIF_CANCEL) {
      this.s.state = TPMIF_IDLE;
      this.s.ev.notify();
      return;
    }
    if (st !== TPMIF_SUBMIT) return;
    const rsp = handler(this.s.view(this.scratch), this.s.u8[5]!);
    if (this.s.state === TPMIF_CANCEL) {
      // cancelled while running: the front asked to drop it
      this.s.state = TPMIF_IDLE;
      this.s.ev.notify();
      return;
    }
    if (rsp.length > MAX_TPMIF_DATA) {
      this.s.dv.setUint32(0, 0, true);
      this.s.state = TPMIF_IDLE;
    } else {
      this.s.write(rsp);
      this.s.state = TPMIF_FINISH;
    }
    this.s.ev.notify();
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

  /** Blocking serve loop (worker threads). Returns 'stopped' after stopFrom(), 'closed'
   *  when the channel closes or the front end dies. Handler exceptions are answered with
   *  an empty IDLE (the front gets EIO) and the loop goes on. */
  serveSync(handler: TpmifHandler, spinUs = 0): 'stopped' | 'closed' {
    for (;;) {
      try {
        this.handleOne(handler);
      } catch (e) {
        if (!this.answerFailed(e)) return 'closed';
      }
      try {
        this.s.ev.waitSync(Infinity, spinUs);
      } catch (e) {
        return waitEnded(e);
      }
    }
  }

  /** Event-loop serve loop (the isolated vtpmd's one thread): commands run synchronously
   *  on it. A guest's next command usually follows its last response within microseconds,
   *  so after each one the thread waits for the next in the kernel itself, up to
   *  BURST_WAIT_MS; only then (or after BURST_BUDGET_MS of commands, so signals and xenbus
   *  events are never held back longer) the wait moves to a koffi pool thread, whose wake-up
   *  costs one more thread switch per command. Resolves as serveSync returns. */
  serveAsync(handler: TpmifHandler): Promise<'stopped' | 'closed'> {
    return new Promise((resolve) => {
      const next = (err: unknown): void => {
        if (err) return resolve(waitEnded(err));
        const budgetEnd = performance.now() + BURST_BUDGET_MS;
        for (;;) {
          try {
            this.handleOne(handler);
          } catch (e) {
            if (!this.answerFailed(e)) return resolve('closed');
          }
          if (performance.now() >= budgetEnd) {
            setImmediate(next, null);
            return;
          }
          try {
            this.s.ev.waitSync(BURST_WAIT_MS);
          } catch (e) {
            if (e instanceof VtpmError && e.code === 'ETIMEDOUT') break;
            return resolve(waitEnded(e));
          }
        }
        this.s.ev.waitThen(next);
      };
      next(null);
    });
  }

  /** Non-blocking form, for a thread that waits on many channels at once (EvtchnMux, the
   *  grouped vtpmd): answer the request on the page now, if there is one, and return.
   *  'idle' when nothing was submitted, 'closed' when the channel is gone. Handler
   *  exceptions are answered with an empty IDLE, as in serveSync. The caller does the
   *  waiting (this side's events must be routed to its mux, not waited for here). */
  serveReady(handler: TpmifHandler): 'served' | 'idle' | 'closed' {
    const st = this.s.state;
    if (st !== TPMIF_SUBMIT && st !== TPMIF_CANCEL) return this.s.ev.closed ? 'closed' : 'idle';
    try {
      this.handleOne(handler);
    } catch (e) {
      if (!this.answerFailed(e)) return 'closed';
    }
    return 'served';
  }

  /** Unmap what attach() mapped. */
  detach(): void {
    this.s.detach();
  }
}
