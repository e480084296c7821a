// A SyncTransport that runs libtpms in the calling thread (the FUSE worker, or a backend
// worker): for tests, benchmarks and standalone nodes. The TPM is started up (Startup
// CLEAR) before the backend is handed out, as the kernel does at boot: a device node is
// never un-started. libtpms keeps global state: one engine backend per process.
//   spec = { module: ENGINE_BACKEND_MODULE, export: 'createEngineBackend', params: { version: '2.0' } }
import { fileURLToPath } from 'node:url';
import { MemoryStateStore, type StateStore, type TpmVersion } from '../tpm/engine.ts';
import { VtpmError } from '../base/errors.ts';
import { DirStateStore } from '../host/state-dir.ts';
import { bootTpm, LibtpmsEngine } from './libtpms-engine.ts';
import type { TransportSpec, SyncTransport } from '../tpm/transport.ts';

export const ENGINE_BACKEND_MODULE = fileURLToPath(import.meta.url);

export interface EngineBackendParams {
  version: TpmVersion;
  /** Keep NVRAM in this directory (0700, files 0600); in memory when absent. */
  stateDir?: string;
}

export function engineBackendSpec(params: EngineBackendParams): TransportSpec {
  return { module: ENGINE_BACKEND_MODULE, export: 'createEngineBackend', params };
}

export function createEngineBackend(params: unknown): SyncTransport {
  const p = params as EngineBackendParams;
  if (!p || (p.version !== '1.2' && p.version !== '2.0')) throw new VtpmError('EINVAL', 'engine backend needs params.version "1.2" or "2.0"');
  const store: StateStore = p.stateDir ? new DirStateStore(p.stateDir) : new MemoryStateStore();
  const engine = new LibtpmsEngine({ version: p.version, store });
  const out = new Uint8Array(4096); // libtpms' response copied here: no allocation per command
  try {
    bootTpm(engine, { selfTest: false });
  } catch (e) {
    engine.terminate();
    throw e;
  }
  return {
    transmitSync(cmd, locality) {
      const n = engine.processInto(cmd, out, locality);
      return out.subarray(0, n);
    },
    close() {
      engine.terminate();
    },
  };
}
