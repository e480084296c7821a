// vtpmd's engine thread: owns the libtpms engine and serves the guest's tpmif shared page
// with blocking futex waits, so a command never waits for a JavaScript event-loop turn.
// The main thread does the xenbus handshake and hands each connection's TpmifParams here;
// the engine (and the TPM's state) lives across front-end reconnects.
import { parentPort, workerData } from 'node:worker_threads';
import { errorResponse } from '../drivers/tpm/command.ts';
import type { StateStore, TpmVersion } from '../drivers/tpm/engine.ts';
import { TPM_RC_FAILURE, TPM_FAIL } from '../drivers/tpm/rc.ts';
import * as tpm12 from '../drivers/tpm/tpm12.ts';
import * as tpm2 from '../drivers/tpm/tpm2.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { type TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { bootTpm, LibtpmsEngine } from '../drivers/libtpms/libtpms-engine.ts';
import { DirStateStore } from '../drivers/host/state-dir.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';

export interface EngineWorkerData {
  version: TpmVersion;
  stateDir: string;
}

/** Main → worker. */
export type EngineWorkerRequest = { op: 'serve'; tpmif: TpmifParams } | { op: 'exit' };
/** Worker → main. */
export type EngineWorkerEvent =
  | { ev: 'ready'; resumed: boolean }
  | { ev: 'closed'; why: 'stopped' | 'closed' }
  | { ev: 'error'; code: string; message: string };

const data = workerData as EngineWorkerData;
const port = parentPort!;

let engine: LibtpmsEngine;
try {
  const store: StateStore = new DirStateStore(data.stateDir);
  engine = new LibtpmsEngine({ version: data.version, store });
  bootTpm(engine, { selfTest: true });
  port.postMessage({ ev: 'ready', resumed: false } satisfies EngineWorkerEvent);
} catch (e) {
  const err = e as { code?: string; message?: string };
  port.postMessage({ ev: 'error', code: err.code ?? 'EENGINE', message: err.message ?? String(e) } satisfies EngineWorkerEvent);
  process.exit(1);
}

// One response buffer for the life of the thread: the handler returns a view of it.
const out = new Uint8Array(4096);
const failTag = engine.version === '2.0' ? tpm2.TPM_ST_NO_SESSIONS : tpm12.TPM_TAG_RSP_COMMAND;
const failure = errorResponse(failTag, engine.version === '2.0' ? TPM_RC_FAILURE : TPM_FAIL);
let lastError = '';

function handle(cmd: Uint8Array, locality: number): Uint8Array {
  try {
    return out.subarray(0, engine.processInto(cmd, out, locality));
  } catch (e) {
    // A failure below the guest is a TPM failure response, never a hang; report it once.
    const msg = (e as Error).message;
    if (msg !== lastError) {
      lastError = msg;
      console.error(`vtpmd: command failed: ${msg}${(e as Error).cause ? ` (cause: ${((e as Error).cause as Error).message})` : ''}`);
    }
    return failure;
  }
}

port.on('message', (m: EngineWorkerRequest) => {
  if (m.op === 'exit') {
    engine.terminate();
    process.exit(0);
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
