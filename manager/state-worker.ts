// The manager's side of every instance's state link (vtpmmgr's tpmback), in one thread
// for the whole host: vtpmd's load/store/delete requests are served from each link's tpmif
// page, the thread waiting for all of them at once on one EvtchnMux (Xen's 2-level event
// channels), so a store's encryption and fsyncs never wait on (or stall) the manager's
// event loop and a host of hundreds of instances runs one thread, not one each (~10 MB of
// isolate per thread). Each link is served for its own instance only: the handler refuses
// a request naming another uuid.
//
// The main thread (state-thread.ts) posts {op:'add', id, link} / {op:'remove', id} on the
// control port and then notifies the control event channel (a loopback channel of the
// manager's domain), which is one more port of the mux: the thread drains the port when it
// fires. It posts {ev:'versions'} after every committed store or delete, and {ev:'ended'}
// when a link ends (closed by its vtpmd, or removed).
import { receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { describeError, isVtpmError } from '../drivers/base/errors.ts';
import { stateLinkHandler } from '../drivers/statelink/server.ts';
import type { StateStore } from '../drivers/tpm/engine.ts';
import { TpmifBack, type TpmifHandler } from '../drivers/tpmback/tpmif-back.ts';
import type { EvtchnParams } from '../drivers/xen/evtchn.ts';
import { EvtchnClosedError, EvtchnMux } from '../drivers/xen/evtchn-mux.ts';
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

export interface StateThreadData {
  /** Our end of the control channel (in the mux). */
  control: EvtchnParams;
  port: MessagePort;
}

export type StateThreadRequest = { op: 'add'; id: number; link: StateWorkerData } | { op: 'remove'; id: number };

export type StateWorkerEvent =
  | { ev: 'versions'; id: number; versions: Record<string, number> }
  | { ev: 'ended'; id: number; why: string; versions: Record<string, number> };

interface Link {
  id: number;
  name: string;
  back: TpmifBack;
  store: InstanceStore;
  handler: TpmifHandler;
}

const d = workerData as StateThreadData;
const port = d.port;
const mux = new EvtchnMux();
const control = mux.add(d.control);
const links = new Map<number, Link>(); // by mux slot
const slotOf = new Map<number, number>(); // link id → slot
const log = (name: string, line: string) => console.error(`${new Date().toISOString()} manager: instance ${name}: ${line}`);

function add(id: number, l: StateWorkerData): void {
  const store = new InstanceStore({ stateDir: l.stateDir, uuid: l.uuid, key: l.key, minVersions: l.minVersions });
  // The table learns each new version as it is committed (one small message per NV write).
  const reporting: StateStore = {
    load: (name) => store.load(name),
    store(name, data) {
      store.store(name, data);
      port.postMessage({ ev: 'versions', id, versions: store.versions() } satisfies StateWorkerEvent);
    },
    delete(name) {
      store.delete(name);
      port.postMessage({ ev: 'versions', id, versions: store.versions() } satisfies StateWorkerEvent);
    },
  };
  let back: TpmifBack | undefined;
  try {
    back = TpmifBack.attach(l.params);
    const slot = mux.add(l.params.evtchn);
    const link = { id, name: l.name, back, store, handler: stateLinkHandler({ uuid: l.uuid, backend: reporting, log: (line) => log(l.name, line) }) };
    links.set(slot, link);
    slotOf.set(id, slot);
    serve(slot, link); // vtpmd may have sent its first load before the link reached us
  } catch (e) {
    back?.detach();
    log(l.name, `state link failed: ${describeError(e)}`);
    port.postMessage({ ev: 'ended', id, why: `failed: ${describeError(e)}`, versions: store.versions() } satisfies StateWorkerEvent);
  }
}

function end(slot: number, why: string, inMux = true): void {
  const link = links.get(slot);
  if (!link) return;
  links.delete(slot);
  slotOf.delete(link.id);
  if (inMux) {
    try {
      mux.remove(slot);
    } catch (e) {
      log(link.name, `state link: leaving the mux: ${describeError(e)}`);
    }
  }
  link.back.detach();
  port.postMessage({ ev: 'ended', id: link.id, why, versions: link.store.versions() } satisfies StateWorkerEvent);
}

function serve(slot: number, link: Link): void {
  if (link.back.serveReady(link.handler) === 'closed') end(slot, 'closed');
}

/** The main thread's requests, all that are there. */
function drain(): void {
  for (let m = receiveMessageOnPort(port); m; m = receiveMessageOnPort(port)) {
    const r = m.message as StateThreadRequest;
    if (r.op === 'add') add(r.id, r.link);
    else {
      const slot = slotOf.get(r.id);
      if (slot !== undefined) end(slot, 'stopped');
    }
  }
}

let strikes = 0;
for (;;) {
  let n: number;
  try {
    n = mux.waitAny();
    strikes = 0;
  } catch (e) {
    // Interrupted: the process is exiting (evtchn-ports' exit hook): waiting on would hold
    // up its exit for good (it joins this thread, which sleeps in a futex nobody wakes).
    if (isVtpmError(e, 'ECANCELED')) break;
    if (!(e instanceof EvtchnClosedError)) {
      // Not one link's end: every link depends on this thread, so it is said and survived
      // (unless it repeats: then the thread ends and the next run starts a new one).
      console.error(`${new Date().toISOString()} manager: state thread: ${describeError(e)}`);
      if (++strikes > 100) break;
      continue;
    }
    if (e.slot === control) break; // the manager's domain is gone (its authority died)
    end(e.slot, 'closed', false);
    continue;
  }
  for (let i = 0; i < n; i++) {
    const slot = mux.ready[i]!;
    if (slot === control) drain();
    else {
      const link = links.get(slot);
      if (link) serve(slot, link);
    }
  }
}
for (const slot of [...links.keys()]) end(slot, 'closed');
mux.close();
port.close();
