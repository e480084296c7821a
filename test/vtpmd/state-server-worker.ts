// Worker of state-server.ts: the manager's side of many state links in one thread, one
// EvtchnMux over all their channels (as the grouped vtpmd serves its guests), each link
// answered by stateLinkHandler over a DirStateStore of its instance. Links arrive from the
// main thread on `port`, announced by a notify on the control channel.
import { appendFileSync } from 'node:fs';
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { isVtpmError } from '../../drivers/base/errors.ts';
import { DirStateStore } from '../../drivers/host/state-dir.ts';
import { stateLinkHandler } from '../../drivers/statelink/server.ts';
import { TpmifBack, type TpmifHandler } from '../../drivers/tpmback/tpmif-back.ts';
import type { EvtchnParams } from '../../drivers/xen/evtchn.ts';
import { EvtchnClosedError, EvtchnMux } from '../../drivers/xen/evtchn-mux.ts';
import type { TpmifParams } from '../../drivers/xen/tpmif-page.ts';

export interface StateServerWorkerData {
  control: EvtchnParams;
  port: MessagePort;
  log: string;
}
/** A link to serve; `refuse`: answer every request of that instance with an error (a
 *  manager whose store fails). */
export type StateServerRequest = { op: 'serve'; params: TpmifParams; uuid: string; dir: string } | { op: 'fail'; uuid: string };

const wd = workerData as StateServerWorkerData;
const mux = new EvtchnMux();
/** Routed, with the area mapped now (as group-worker.ts does): the record may be freed by
 *  both owners before the mux reports its close. */
function route(p: EvtchnParams): number {
  const slot = mux.add(p);
  mux.endpoint(slot).area(p.side);
  return slot;
}
const control = route(wd.control);
const links = new Map<number, { back: TpmifBack; handler: TpmifHandler; uuid: string }>();
const failing = new Set<string>();
const log = (line: string) => appendFileSync(wd.log, `${line}\n`);

class FailingStore extends DirStateStore {
  constructor(dir: string, private readonly uuid: string) {
    super(dir);
  }
  override store(name: string, data: Uint8Array): void {
    if (failing.has(this.uuid)) throw new Error(`test: the store of ${this.uuid} fails`);
    super.store(name, data);
  }
}

parentPort!.postMessage({ up: true });
for (;;) {
  let n: number;
  try {
    n = mux.waitAny();
  } catch (e) {
    if (e instanceof EvtchnClosedError) {
      links.get(e.slot)?.back.detach();
      links.delete(e.slot);
      continue;
    }
    if (isVtpmError(e, 'ECANCELED')) break;
    throw e;
  }
  for (let i = 0; i < n; i++) {
    const slot = mux.ready[i]!;
    if (slot === control) {
      for (let r = receiveMessageOnPort(wd.port); r; r = receiveMessageOnPort(wd.port)) {
        const m = r.message as StateServerRequest;
        if (m.op === 'fail') {
          failing.add(m.uuid);
          continue;
        }
        const back = TpmifBack.attach(m.params);
        const s = route(m.params.evtchn);
        links.set(s, { back, uuid: m.uuid, handler: stateLinkHandler({ uuid: m.uuid, backend: new FailingStore(m.dir, m.uuid), log }) });
        back.serveReady(links.get(s)!.handler);
      }
      continue;
    }
    const l = links.get(slot);
    if (l) l.back.serveReady(l.handler);
  }
}
mux.close();
