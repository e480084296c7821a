// A libtpms engine as a SyncTransport named by a spec, built in the thread that uses it (the
// FUSE worker, a backend worker, the TIS chip worker). By default the TPM is started up
// (Startup CLEAR) before the backend is handed out, as the kernel does at boot: a device
// node is never un-started. An emulated chip passes boot: false (its firmware, the caller,
// sends Startup). libtpms keeps global state: one engine per library copy per process,
// hence privateCopy for the host's chip.
//   spec = engineBackendSpec({ version: '2.0' })
import { VtpmError } from '../base/errors.ts';
import { codeFile } from '../base/modules.ts';
import { DirStateStore } from '../host/state-dir.ts';
import { engineTransport } from '../tpm/adapters.ts';
import { bootTpm } from '../tpm/boot.ts';
import { MemoryStateStore, type StateStore, type TpmVersion } from '../tpm/engine.ts';
import type { SyncTransport, TransportSpec } from '../tpm/transport.ts';
import { LibtpmsEngine } from './libtpms-engine.ts';

/** This module, as the thread that builds the engine imports it (named from the checkout's
 *  root: a bundled copy of this code is no module a thread can import). */
export const ENGINE_BACKEND_MODULE = codeFile('drivers/libtpms/engine-backend');

export interface EngineBackendParams {
  version: TpmVersion;
  /** Keep NVRAM in this directory (0700, files 0600); in memory when absent. */
  stateDir?: string;
  /** Run on a private copy of libtpms (own globals), beside another engine of this process. */
  privateCopy?: boolean;
  /** Send Startup(CLEAR) before handing the backend out (default true). */
  boot?: boolean;
}

export function engineBackendSpec(params: EngineBackendParams): TransportSpec {
  return { module: ENGINE_BACKEND_MODULE, export: 'createEngineBackend', params };
}

export function createEngineBackend(params: unknown): SyncTransport {
  const p = params as EngineBackendParams;
  if (!p || (p.version !== '1.2' && p.version !== '2.0')) throw new VtpmError('EINVAL', 'engine backend needs params.version "1.2" or "2.0"');
  const store: StateStore = p.stateDir ? new DirStateStore(p.stateDir) : new MemoryStateStore();
  const engine = new LibtpmsEngine({ version: p.version, store, privateCopy: p.privateCopy === true });
  try {
    if (p.boot !== false) bootTpm(engine, { selfTest: false });
  } catch (e) {
    engine.terminate();
    throw e;
  }
  return engineTransport(engine);
}
