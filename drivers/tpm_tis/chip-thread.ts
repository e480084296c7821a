// A TisChip whose TPM (any SyncTransport, named by a TransportSpec) runs in a worker thread.
// Command and response cross through shared buffers and a futex word (Atomics), not
// postMessage: the submit and the "done" check are a store and a load, so the register
// file stays cheap and never waits on the TPM.
import { Worker } from 'node:worker_threads';
import { failureResponse } from '../tpm/command.ts';
import { codeFile, startWorker } from '../base/modules.ts';
import { errorFromWire, VtpmError, type WireError } from '../base/errors.ts';
import { checkTransportSpec, type TransportSpec } from '../tpm/transport.ts';
import type { TisChip } from './chip.ts';
import { TIS_BUFFER_SIZE } from './regs.ts';

/** Slots of the control word array. */
export const CTL = { state: 0, cmdLen: 1, locality: 2, respLen: 3, close: 4, sleeping: 5 } as const;
/** Values of CTL.state: who owns the buffers. */
export const CHIP = { IDLE: 0, SUBMIT: 1, DONE: 2 } as const;

export interface ChipThreadData {
  ctl: SharedArrayBuffer;
  cmd: SharedArrayBuffer;
  resp: SharedArrayBuffer;
  /** The TPM the worker loads and serves. */
  transport: TransportSpec;
  spinUs: number;
}

/** Worker → main. */
export type ChipThreadEvent = { ready: true } | { closed: true } | { error: WireError };

export interface ChipThreadOptions {
  /** The TPM behind the chip: a SyncTransport built in the worker. */
  transport: TransportSpec;
  /** How long the worker spins for the next command before sleeping (µs). */
  spinUs?: number;
  startTimeoutMs?: number;
}

type WaitAsync = (a: Int32Array, i: number, v: number, ms: number) => { async: boolean; value: Promise<string> | string };
const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;
const FAILURE = failureResponse('2.0');

// Workers do not inherit tsx's loader hooks: register them first, then load the worker.
const WORKER = codeFile('drivers/tpm_tis/chip-thread-worker');

export class ChipThread implements TisChip {
  private readonly ctl: Int32Array;
  private readonly cmd: Uint8Array;
  private readonly resp: Uint8Array;
  private dead: Error | undefined;
  private exited: Promise<void>;

  private constructor(
    private readonly worker: Worker,
    data: ChipThreadData,
  ) {
    this.ctl = new Int32Array(data.ctl);
    this.cmd = new Uint8Array(data.cmd);
    this.resp = new Uint8Array(data.resp);
    this.exited = new Promise((resolve) => worker.once('exit', () => resolve()));
    const die = (e: Error) => {
      // A dead chip answers the command in flight with TPM_RC_FAILURE instead of hanging.
      this.dead ??= e;
      Atomics.store(this.ctl, CTL.respLen, 0);
      Atomics.store(this.ctl, CTL.state, CHIP.DONE);
      Atomics.notify(this.ctl, CTL.state);
    };
    worker.on('error', die);
    worker.on('exit', (code) => die(new VtpmError('ECLOSED', `chip worker exited (${code})`)));
  }

  static async start(opts: ChipThreadOptions): Promise<ChipThread> {
    checkTransportSpec(opts.transport);
    const data: ChipThreadData = {
      ctl: new SharedArrayBuffer(8 * 4),
      cmd: new SharedArrayBuffer(TIS_BUFFER_SIZE),
      resp: new SharedArrayBuffer(TIS_BUFFER_SIZE),
      transport: opts.transport,
      spinUs: opts.spinUs ?? 200,
    };
    const worker = startWorker(WORKER, { workerData: data });
    const chip = new ChipThread(worker, data);
    const timeoutMs = opts.startTimeoutMs ?? 10_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        timer = setTimeout(() => reject(new VtpmError('ETIMEDOUT', `chip worker not ready after ${timeoutMs} ms`)), timeoutMs);
        worker.on('message', (m: ChipThreadEvent) => {
          if ('ready' in m) resolve();
          if ('error' in m) {
            // The code and causes from the worker survive; the message says where it failed.
            const e = errorFromWire(m.error, 'EENGINE');
            reject(new VtpmError(e.code, `chip worker failed to start: ${e.message}`, { cause: e.cause }));
          }
        });
        worker.once('exit', (code) => reject(new VtpmError('ECLOSED', `chip worker exited (${code}) before it was ready`)));
      });
    } catch (e) {
      await worker.terminate();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    return chip;
  }

  submit(command: Uint8Array, locality: number): void {
    if (this.dead) throw new VtpmError('ECLOSED', 'chip is gone', { cause: this.dead });
    if (Atomics.load(this.ctl, CTL.state) !== CHIP.IDLE) throw new VtpmError('EBUSY', 'chip is still executing');
    if (command.length > this.cmd.length) throw new VtpmError('EOVERSIZE', `command of ${command.length} bytes`);
    this.cmd.set(command);
    Atomics.store(this.ctl, CTL.cmdLen, command.length);
    Atomics.store(this.ctl, CTL.locality, locality);
    Atomics.store(this.ctl, CTL.state, CHIP.SUBMIT);
    // A futex wake only when the worker sleeps; a spinning worker sees the store itself.
    if (Atomics.compareExchange(this.ctl, CTL.sleeping, 1, 0) === 1) Atomics.notify(this.ctl, CTL.sleeping);
  }

  poll(): Uint8Array | undefined {
    if (Atomics.load(this.ctl, CTL.state) !== CHIP.DONE) return undefined;
    // A view, not a copy: the worker writes the buffer again only after the next submit,
    // and the register file drops a response before it submits another command.
    const r = this.dead ? FAILURE : this.resp.subarray(0, Atomics.load(this.ctl, CTL.respLen));
    Atomics.store(this.ctl, CTL.state, CHIP.IDLE);
    return r;
  }

  whenDone(timeoutMs: number): Promise<void> {
    const w = waitAsync(this.ctl, CTL.state, CHIP.SUBMIT, timeoutMs);
    return w.async ? (w.value as Promise<string>).then(() => undefined) : Promise.resolve();
  }

  /** The worker runs a command to its end (libtpms does too); the model drops an aborted
   *  command's answer. */
  cancel(): void {}

  /** Let the worker finish the command in flight and close its transport (an engine saves). */
  async close(): Promise<void> {
    Atomics.store(this.ctl, CTL.close, 1);
    Atomics.notify(this.ctl, CTL.state);
    Atomics.store(this.ctl, CTL.sleeping, 0);
    Atomics.notify(this.ctl, CTL.sleeping);
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(true), 10_000)));
    if (await Promise.race([this.exited.then(() => false), late])) await this.worker.terminate();
    clearTimeout(timer);
  }
}
