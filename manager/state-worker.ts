// The manager's side of one instance's state link (vtpmmgr's tpmback): serves vtpmd's
// load/store/delete requests from the tpmif page with blocking futex waits, in a thread of
// its own, so a store's encryption and fsyncs never wait on (or stall) the manager's event
// loop. Serves that instance only: the handler refuses a request naming another uuid.
// Posts {versions} (what the table should record) after every committed store, and when
// the link ends.
import { parentPort } from 'node:worker_threads';
import { describeError } from '../drivers/base/errors.ts';
import { stateLinkHandler } from '../drivers/statelink/server.ts';
import type { StateStore } from '../drivers/tpm/engine.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import type { TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { InstanceStore } from './store/blob-store.ts';

export interface StateWorkerData {
  params: TpmifParams;
  stateDir: string;
  uuid: string;
  name: string;
  key: Uint8Array;
  minVersions: Record<string, number>;
}

export type StateWorkerEvent = { ev: 'versions'; versions: Record<string, number> } | { ev: 'ended'; why: string; versions: Record<string, number> };

const port = parentPort!;

/** Serve one link until it ends. The thread is started before its link exists (its modules
 *  load while vtpmd starts), and gets its data in the first message. */
function serve(d: StateWorkerData): void {
  const log = (line: string) => console.error(`${new Date().toISOString()} manager: instance ${d.name}: ${line}`);
  const store = new InstanceStore({ stateDir: d.stateDir, uuid: d.uuid, key: d.key, minVersions: d.minVersions });
  // The table learns each new version as it is committed (one small message per NV write).
  const reporting: StateStore = {
    load: (name) => store.load(name),
    store(name, data) {
      store.store(name, data);
      port.postMessage({ ev: 'versions', versions: store.versions() } satisfies StateWorkerEvent);
    },
    delete(name) {
      store.delete(name);
      port.postMessage({ ev: 'versions', versions: store.versions() } satisfies StateWorkerEvent);
    },
  };
  const back = TpmifBack.attach(d.params);
  let why: string;
  try {
    why = back.serveSync(stateLinkHandler({ uuid: d.uuid, backend: reporting, log }));
  } catch (e) {
    why = `failed: ${describeError(e)}`;
    log(`state link ${why}`);
  } finally {
    back.detach();
  }
  port.postMessage({ ev: 'ended', why, versions: store.versions() } satisfies StateWorkerEvent);
}

port.once('message', (d: StateWorkerData) => serve(d));
