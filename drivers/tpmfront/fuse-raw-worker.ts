// Worker entry of the raw FUSE front end: builds the backend from its spec here (it cannot
// cross threads), asks it whether it is a TPM 2.0 (then tpmrm0 is served too, through a
// resource manager on this thread), serves the /dev/fuse fd until unmount/stop, then
// closes both.
import { parentPort, workerData } from 'node:worker_threads';
import { loadTransport, type TransportSpec, type SyncTransport } from '../tpm/transport.ts';
import { backendErrorReporter } from './backend-error.ts';
import { FuseServer } from './fuse-serve.ts';
import { sysClose } from '../base/libc.ts';
import { TpmDevCore } from './tpmdev.ts';
import { dropStartupGarbage } from '../base/modules.ts';
import { ResourceManager } from '../tpmrm/resource-manager.ts';

export interface RawWorkerData {
  fd: number;
  backend: TransportSpec;
  stop: SharedArrayBuffer;
  maxWrite?: number;
  graceMs?: number;
  responseTimeoutMs?: number;
  uid?: number;
  gid?: number;
  /** Serve tpmrm0 when the backend is a TPM 2.0 (default true). */
  tpmrm?: boolean;
}

export type RawWorkerMessage =
  | { type: 'init'; minor: number; tpmrm: boolean }
  | { type: 'error'; message: string; code?: string }
  | { type: 'end'; how: string; dropped: number };

const d = workerData as RawWorkerData;
const post = (m: RawWorkerMessage) => parentPort!.postMessage(m);
let backend: SyncTransport | null = null;
try {
  backend = await loadTransport(d.backend);
  const rm = d.tpmrm === false ? null : ResourceManager.detect(backend);
  const server = new FuseServer({
    rm,
    fd: d.fd,
    backend,
    core: new TpmDevCore({ graceMs: d.graceMs, responseTimeoutMs: d.responseTimeoutMs }),
    uid: d.uid,
    gid: d.gid,
    maxWrite: d.maxWrite,
    stop: new Int32Array(d.stop),
    onBackendError: backendErrorReporter(),
    onInit: (minor) => {
      post({ type: 'init', minor, tpmrm: rm !== null });
      dropStartupGarbage();
    },
  });
  const how = server.run();
  if (server.writeError) post({ type: 'error', message: server.writeError.message, code: server.writeError.code });
  post({ type: 'end', how, dropped: server.dropped });
} catch (e) {
  post({ type: 'error', message: (e as Error).message, code: (e as { code?: string }).code });
} finally {
  // Closing the fd aborts the FUSE connection: clients still holding tpm0 get ENOTCONN.
  sysClose(d.fd);
  try {
    backend?.close();
  } catch (e) {
    post({ type: 'error', message: `backend close: ${(e as Error).message}`, code: (e as { code?: string }).code });
  }
}
