// Worker entry of RmThread: builds the backend from its spec, puts a resource manager over it
// when it is a TPM 2.0, and answers tpm0 commands and space requests one message at a time,
// in order (so tpm0's and tpmrm0's commands serialize, as on the chip's mutex in Linux).
import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire } from '../base/errors.ts';
import { loadTransport, type TransportSpec } from '../tpm/transport.ts';
import { ResourceManager } from './resource-manager.ts';
import type { Space } from './space.ts';
import type { RmThreadReply, RmThreadRequest } from './rm-thread.ts';

const port = parentPort!;
const post = (m: RmThreadReply) => port.postMessage(m);
try {
  const { spec, tpmrm } = workerData as { spec: TransportSpec; tpmrm: boolean };
  const backend = await loadTransport(spec);
  const rm = tpmrm ? ResourceManager.detect(backend) : null;
  const spaces = new Map<number, Space>();
  port.on('message', (m: RmThreadRequest) => {
    if (m.op === 'close') {
      try {
        backend.close();
      } finally {
        port.close();
      }
      return;
    }
    try {
      switch (m.op) {
        case 'transmit':
          // slice: the backend may hand out a view of a buffer it reuses
          return post({ id: m.id, rsp: backend.transmitSync(m.cmd, m.locality).slice() });
        case 'open': {
          const s = rm!.openSpace();
          spaces.set(s.id, s);
          return post({ id: m.id, space: s.id });
        }
        case 'execute': {
          const s = spaces.get(m.space);
          if (!s) return post({ id: m.id, errno: 9 }); // EBADF
          const r = rm!.execute(s, m.cmd, m.locality);
          return post(typeof r === 'number' ? { id: m.id, errno: -r } : { id: m.id, rsp: r.slice() });
        }
        case 'release': {
          const s = spaces.get(m.space);
          spaces.delete(m.space);
          if (s) rm!.closeSpace(s);
          return post({ id: m.id, done: true });
        }
      }
    } catch (e) {
      post({ id: m.id, error: errorToWire(e) });
    }
  });
  post({ id: 0, ready: true, tpmrm: rm !== null });
} catch (e) {
  post({ id: 0, error: errorToWire(e) });
  port.close();
}
