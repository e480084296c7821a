// A libtpms engine behind the split form of SyncTransport (begin/finish), as vtpmd over tpmif
// is: the raw front end then answers a tpm0 WRITE before the response exists. The command
// runs when finish() collects it, and its response lands in the engine transport's reused
// buffer: a front end that kept a view of it, or let another command run first, is caught.
//   spec = splitEngineBackendSpec()
import { fileURLToPath } from 'node:url';
import { createEngineBackend } from '../../drivers/libtpms/engine-backend.ts';
import type { SyncTransport, TransportSpec } from '../../drivers/tpm/transport.ts';

export function splitEngineBackendSpec(): TransportSpec {
  return { module: fileURLToPath(import.meta.url), export: 'createSplitEngineBackend', params: {} };
}

export function createSplitEngineBackend(): SyncTransport {
  const inner = createEngineBackend({ version: '2.0' });
  let pending: Uint8Array | null = null;
  return {
    transmitSync(cmd, locality) {
      if (pending) throw new Error('transmitSync while a begun command is not collected');
      return inner.transmitSync(cmd, locality);
    },
    begin(cmd) {
      if (pending) throw new Error('begin while a begun command is not collected');
      pending = cmd.slice();
    },
    finish() {
      const cmd = pending;
      pending = null;
      if (!cmd) throw new Error('finish with nothing begun');
      return inner.transmitSync(cmd, 0);
    },
    close: () => inner.close(),
  };
}
