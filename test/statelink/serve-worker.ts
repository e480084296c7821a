// Worker of link-server.ts: serves one state link until stopped or closed; log lines go
// synchronously to a file the test reads.
import { appendFileSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { TpmifBack } from '../../drivers/tpmback/tpmif-back.ts';
import { DirStateStore } from '../../drivers/host/state-dir.ts';
import { InstanceStore } from '../../manager/store/blob-store.ts';
import type { TpmifParams } from '../../drivers/xen/tpmif-page.ts';
import { stateLinkHandler } from '../../drivers/statelink/server.ts';

export interface ServeWorkerData {
  params: TpmifParams;
  uuid: string;
  backend: 'instance' | 'dir';
  state: string;
  /** hex, for the instance store */
  key: string;
  log: string;
}

const wd = workerData as ServeWorkerData;
const backend = wd.backend === 'dir' ? new DirStateStore(wd.state) : new InstanceStore({ stateDir: wd.state, uuid: wd.uuid, key: Buffer.from(wd.key, 'hex') });
const handler = stateLinkHandler({ uuid: wd.uuid, backend, log: (line) => appendFileSync(wd.log, `${line}\n`) });
const why = TpmifBack.attach(wd.params).serveSync(handler);
parentPort!.postMessage({ done: why });
