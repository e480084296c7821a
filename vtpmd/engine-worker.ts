// vtpmd's engine thread: owns the libtpms engine (engine-core.ts) and serves the guest's
// tpmif shared page with blocking futex waits, so a command never waits for a JavaScript
// event-loop turn. The main thread does the xenbus handshake and hands each connection's
// TpmifParams here; the engine (and the TPM's state) lives across front-end reconnects.
import { writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire, VtpmError, type WireError } from '../drivers/base/errors.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { type TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';
import { HostedTpm, type EngineBoot } from './engine-core.ts';

export type { EngineBoot, EngineState } from './engine-core.ts';

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

/** Synchronous: the thread may end right after a line (a console.error could be lost). */
const log = (msg: string) => writeSync(2, `${new Date().toISOString()} vtpmd: ${msg}\n`);

let tpm: HostedTpm | undefined;

function boot(b: EngineBoot): void {
  try {
    tpm = HostedTpm.boot(b, { log });
    port.postMessage({ ev: 'ready', resumed: false } satisfies EngineWorkerEvent);
  } catch (e) {
    port.postMessage({ ev: 'error', ...errorToWire(e) } satisfies EngineWorkerEvent);
    process.exit(1);
  }
}

if (!('warm' in data)) boot(data);

port.on('message', (m: EngineWorkerRequest) => {
  if (m.op === 'boot') return boot(m);
  if (m.op === 'exit') {
    // Runs between commands: a command in flight has been answered, since this thread
    // serves commands synchronously and 'exit' is handled only once the serve loop returned.
    tpm?.stop(); // none: a warm thread that never booted a TPM
    process.exit(0);
  }
  if (m.op === 'suspend') {
    if (!tpm) return port.postMessage({ ev: 'error', ...errorToWire(new VtpmError('EENGINE', 'no TPM was booted')) } satisfies EngineWorkerEvent);
    try {
      const bytes = tpm.suspend();
      port.postMessage({ ev: 'suspended', bytes } satisfies EngineWorkerEvent);
      process.exit(0);
    } catch (e) {
      port.postMessage({ ev: 'error', ...errorToWire(e) } satisfies EngineWorkerEvent);
    }
    return;
  }
  const back = TpmifBack.attach(m.tpmif);
  dropStartupGarbage();
  let why: 'stopped' | 'closed';
  try {
    why = back.serveSync(tpm!.handle);
  } finally {
    back.detach();
  }
  port.postMessage({ ev: 'closed', why } satisfies EngineWorkerEvent);
});
