// Worker entry of ThreadTransport: builds the SyncTransport from its spec and answers one
// command per message, in order.
import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire } from '../base/errors.ts';
import { loadTransport, type TransportSpec } from './transport.ts';
import type { ThreadTransportReply, ThreadTransportRequest } from './thread-transport.ts';

const port = parentPort!;
const post = (m: ThreadTransportReply) => port.postMessage(m);
try {
  const backend = await loadTransport(workerData as TransportSpec);
  port.on('message', (m: ThreadTransportRequest) => {
    if ('close' in m) {
      try {
        backend.close();
      } finally {
        port.close();
      }
      return;
    }
    try {
      // slice: the backend may hand out a view of a buffer it reuses
      post({ id: m.id, rsp: backend.transmitSync(m.cmd, m.locality).slice() });
    } catch (e) {
      post({ id: m.id, error: errorToWire(e) });
    }
  });
  post({ id: 0, ready: true });
} catch (e) {
  post({ id: 0, error: errorToWire(e) });
  port.close();
}
