// vtpmd's engine thread: owns the libtpms engine and serves the guest's tpmif shared page
// with blocking futex waits, so a command never waits for a JavaScript event-loop turn.
// The main thread does the xenbus handshake and hands each connection's TpmifParams here;
// the engine (and the TPM's state) lives across front-end reconnects.
import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { describeError, errorToWire, VtpmError, type WireError } from '../drivers/base/errors.ts';
import { bootTpm, shutdownTpm } from '../drivers/tpm/boot.ts';
import { failureResponse } from '../drivers/tpm/command.ts';
import type { StateStore, TpmVersion } from '../drivers/tpm/engine.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { type TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { LibtpmsEngine } from '../drivers/libtpms/libtpms-engine.ts';
import { DirStateStore } from '../drivers/host/state-dir.ts';
import { LinkStateStore } from '../drivers/statelink/client.ts';
import { TpmifFront } from '../drivers/tpmfront/tpmif-front.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';

/** What the engine boots from: plain blob files in a dir (vtpmd run by hand, tests), or
 *  the manager over the state link. */
export type EngineState = { dir: string } | { link: TpmifParams; uuid: string; timeoutMs: number };

export interface EngineBoot {
  version: TpmVersion;
  state: EngineState;
}

/** The TPM to boot at once, or none: a warm vtpmd's thread starts (its modules and koffi
 *  loaded) before it knows which instance it serves, and boots on a 'boot' request. */
export type EngineWorkerData = EngineBoot | { warm: true };

/** Main → worker. */
export type EngineWorkerRequest = ({ op: 'boot' } & EngineBoot) | { op: 'serve'; tpmif: TpmifParams } | { op: 'exit' } | { op: 'suspend' };
/** Worker → main. An error is a WireError (code, message, causes) beside its `ev`. */
export type EngineWorkerEvent =
  | { ev: 'ready'; resumed: boolean }
  | { ev: 'closed'; why: 'stopped' | 'closed' }
  | { ev: 'suspended'; bytes: number }
  | ({ ev: 'error' } & WireError);

const data = workerData as EngineWorkerData;
const port = parentPort!;

let engine: LibtpmsEngine;
let store: StateStore;
let failure: Uint8Array;

function boot(b: EngineBoot): void {
  try {
    const st = b.state;
    store = 'dir' in st ? new DirStateStore(st.dir) : new LinkStateStore(TpmifFront.attach(st.link, { timeoutMs: st.timeoutMs }), st.uuid);
    engine = new LibtpmsEngine({ version: b.version, store });
    bootTpm(engine, { selfTest: selfTestAtBoot(b.version) });
    failure = failureResponse(engine.version);
    port.postMessage({ ev: 'ready', resumed: false } satisfies EngineWorkerEvent);
  } catch (e) {
    port.postMessage({ ev: 'error', ...errorToWire(e) } satisfies EngineWorkerEvent);
    process.exit(1);
  }
}

/** TPM 1.2 gets TPM_ContinueSelfTest before the node is handed out, as Linux' tpm1 start
 *  sends it (tcsd expects a tested TPM). A TPM 2.0 is not self-tested up front: libtpms
 *  tests each algorithm on its first use, a guest kernel sends its own TPM2_SelfTest, and
 *  the full test (36 ms here) was most of a warm start's time. */
function selfTestAtBoot(v: TpmVersion): boolean {
  return v === '1.2';
}

if (!('warm' in data)) boot(data);

// One response buffer for the life of the thread: the handler returns a view of it.
const out = new Uint8Array(4096);
let lastError = '';

/** The TPM must be brought up again from its last durable state before the next command
 *  (a store failed: libtpms has gone into failure mode for good). */
let reload = false;

function handle(cmd: Uint8Array, locality: number): Uint8Array {
  try {
    if (reload) restartFromStore();
    return out.subarray(0, engine.processInto(cmd, out, locality));
  } catch (e) {
    // A failure below the guest is a TPM failure response, never a hang, and never an
    // acknowledgement of state that was not stored; reported once per distinct cause.
    const msg = describeError(e);
    if (msg !== lastError) {
      lastError = msg;
      console.error(`vtpmd: command failed: ${msg}`);
    }
    if ((e as { code?: string }).code === 'ESTATE') reload = true;
    return failure;
  }
}

/** A TPM reset onto the state the store last acknowledged: what the guest saw acknowledged
 *  is all there; PCRs, sessions and loaded objects start afresh, as after a power cycle.
 *  Throws (and stays pending) while the store cannot even be read. */
function restartFromStore(): void {
  engine.stop();
  engine.start();
  bootTpm(engine, { selfTest: selfTestAtBoot(engine.version) });
  reload = false;
  lastError = '';
  console.error('vtpmd: TPM restarted from its last stored state after a store failure');
}

/** An orderly stop: shut the TPM down as a platform does before power goes, so its next
 *  start is orderly (only a crash may count as a dictionary-attack failure), then end the
 *  engine, also when the shutdown failed. Runs between commands: a command in flight has
 *  been answered, since this thread serves commands synchronously and 'exit' is handled
 *  only once the serve loop has returned. Logged with a synchronous write: the thread
 *  ends right after, before a console.error would reach the log. */
function stopEngine(): void {
  if (!engine) return; // a warm thread that never booted a TPM
  const log = (msg: string) => writeSync(2, `${new Date().toISOString()} vtpmd: ${msg}\n`);
  try {
    shutdownTpm(engine);
    log(`TPM ${engine.version} shut down (orderly)`);
  } catch (e) {
    log(`TPM shutdown failed, the next start will be a non-orderly one: ${describeError(e)}`);
  }
  engine.terminate();
}

/** Suspend: the whole running TPM (PCRs, sessions, loaded objects: libtpms' volatile
 *  state) goes to the store as 'volatilestate', and the engine ends WITHOUT a TPM shutdown,
 *  so the next start resumes exactly here (the engine loads that blob before power-on and
 *  deletes it once resumed). Runs between commands, like stopEngine. A store that fails
 *  leaves the TPM running and says why: nothing is half-suspended. */
function suspendEngine(): EngineWorkerEvent {
  try {
    const blob = engine.getState('volatile');
    if (!blob) throw new VtpmError('EENGINE', 'libtpms has no volatile state to save');
    store.store('volatilestate', blob);
    engine.terminate();
    return { ev: 'suspended', bytes: blob.length };
  } catch (e) {
    return { ev: 'error', ...errorToWire(new VtpmError('ESTATE', 'suspend failed: the TPM keeps running', { cause: e })) };
  }
}

port.on('message', (m: EngineWorkerRequest) => {
  if (m.op === 'boot') return boot(m);
  if (m.op === 'exit') {
    stopEngine();
    process.exit(0);
  }
  if (m.op === 'suspend') {
    if (!engine) return port.postMessage({ ev: 'error', ...errorToWire(new VtpmError('EENGINE', 'no TPM was booted')) } satisfies EngineWorkerEvent);
    const ev = suspendEngine();
    port.postMessage(ev);
    if (ev.ev === 'suspended') process.exit(0);
    return;
  }
  const back = TpmifBack.attach(m.tpmif);
  dropStartupGarbage();
  let why: 'stopped' | 'closed';
  try {
    why = back.serveSync(handle);
  } finally {
    back.detach();
  }
  port.postMessage({ ev: 'closed', why } satisfies EngineWorkerEvent);
});
