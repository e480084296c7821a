// An engine thread of the grouped vtpmd (group.ts): hosts several vTPM engines, each on
// its own private copy of libtpms (own globals; its koffi callbacks belong to this
// thread's isolate, so an engine never moves), and serves all their guests' tpmif pages
// from one EvtchnMux: the thread sleeps in one futex wait on every channel it serves plus
// its control port, and answers whichever is ready. A command runs to its end before the
// next is looked at, so a slow command (RSA key generation) delays the other engines of
// this thread, never those of another thread. Each engine's state link is used
// synchronously from here (LinkStateStore over its TpmifFront), as in the one-instance
// vtpmd.
//
// Control: the main thread posts a request on `port` and notifies the control channel
// (a loopback port of the group's own domain, routed to this mux); requests are read with
// receiveMessageOnPort between commands, so none runs while a command is in flight.
// Replies and events go back with parentPort.postMessage.
import { writeSync } from 'node:fs';
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { describeError, errorToWire, isVtpmError, VtpmError, type WireError } from '../drivers/base/errors.ts';
import { dropStartupGarbage } from '../drivers/base/modules.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import type { EvtchnParams } from '../drivers/xen/evtchn.ts';
import { EvtchnClosedError, EvtchnMux } from '../drivers/xen/evtchn-mux.ts';
import type { TpmifParams } from '../drivers/xen/tpmif-page.ts';
import { HostedTpm, type EngineBoot } from './engine-core.ts';

export interface GroupWorkerData {
  /** Thread number, for logs. */
  index: number;
  /** Our side of the control channel (routed to this thread's mux). */
  control: EvtchnParams;
  /** Where requests arrive (transferred). */
  port: MessagePort;
}

/** Main → worker, each with an id its reply carries. */
export type GroupWorkerRequest = { id: number } & (
  | { op: 'boot'; name: string; boot: EngineBoot }
  | { op: 'serve'; name: string; tpmif: TpmifParams }
  | { op: 'unserve'; name: string }
  | { op: 'stop'; name: string }
  | { op: 'suspend'; name: string }
  | { op: 'exit' }
);

/** Worker → main: replies, and the unsolicited 'up' and 'closed' (a guest channel ended). */
export type GroupWorkerEvent =
  | { ev: 'up' }
  | { ev: 'closed'; name: string }
  | { ev: 'reply'; id: number; ok: true; bytes?: number }
  | { ev: 'reply'; id: number; ok: false; error: WireError };

const wd = workerData as GroupWorkerData;
const post = (e: GroupWorkerEvent) => parentPort!.postMessage(e);
/** Synchronous: the last lines before the process exits must reach the log. */
const log = (msg: string) => writeSync(2, `${new Date().toISOString()} vtpmd group thread ${wd.index}: ${msg}\n`);

/** A guest connection: its page, and the mux slot its channel is routed to. */
interface Served {
  name: string;
  tpm: HostedTpm;
  back: TpmifBack;
  /** Its engine stopped or took a new connection while this one's close was on its way
   *  through the mux: nothing more is served on it, and its slot is left for the mux to
   *  report (removing it here could race that report onto a reused slot). */
  stale: boolean;
}

interface Engine {
  tpm: HostedTpm;
  slot: number; // -1 while no guest is connected
}

const mux = new EvtchnMux();

/** Route a channel to the mux. Its endpoint maps its 2-level area now, while the channel
 *  record still names it: a record freed by its two owners before the mux has let go of
 *  it (the main thread's xenbus back end released our side) must not be read again to
 *  find the area when the slot leaves the mux. */
function route(p: EvtchnParams): number {
  const slot = mux.add(p);
  mux.endpoint(slot).area(p.side);
  return slot;
}

const controlSlot = route(wd.control);
const engines = new Map<string, Engine>();
const bySlot = new Map<number, Served>();
/** One response buffer for every engine of the thread (copied out before the next command). */
const out = new Uint8Array(4096);

function engineOf(name: string): Engine {
  const e = engines.get(name);
  if (!e) throw new VtpmError('ENOENT', `no engine ${name} on thread ${wd.index}`);
  return e;
}

/** The engine stops taking commands from its guest connection (if any). */
function unserve(e: Engine): void {
  if (e.slot < 0) return;
  const s = bySlot.get(e.slot)!;
  if (mux.endpoint(e.slot).closedForMe) s.stale = true;
  else {
    mux.remove(e.slot);
    bySlot.delete(e.slot);
    s.back.detach();
  }
  e.slot = -1;
}

function handle(m: GroupWorkerRequest): number | undefined {
  switch (m.op) {
    case 'boot': {
      if (engines.has(m.name)) throw new VtpmError('EBUSY', `engine ${m.name} already runs on thread ${wd.index}`);
      const tpm = HostedTpm.boot(m.boot, { privateCopy: true, out, log: (line) => log(`${m.name}: ${line}`) });
      engines.set(m.name, { tpm, slot: -1 });
      log(`${m.name}: TPM ${tpm.version} up (${engines.size} engines on this thread)`);
      return undefined;
    }
    case 'serve': {
      const e = engineOf(m.name);
      unserve(e); // a previous connection whose close has not been reported yet
      const back = TpmifBack.attach(m.tpmif);
      try {
        e.slot = route(m.tpmif.evtchn);
      } catch (err) {
        back.detach();
        throw err;
      }
      bySlot.set(e.slot, { name: m.name, tpm: e.tpm, back, stale: false });
      dropStartupGarbage();
      return undefined;
    }
    case 'unserve':
      // before the main thread closes the guest's back end (and releases its channel)
      unserve(engineOf(m.name));
      return undefined;
    case 'stop': {
      const e = engineOf(m.name);
      unserve(e);
      engines.delete(m.name);
      e.tpm.stop();
      return undefined;
    }
    case 'suspend': {
      const e = engineOf(m.name);
      unserve(e);
      const bytes = e.tpm.suspend(); // throws with the TPM still running: the caller stops it
      engines.delete(m.name);
      log(`${m.name}: suspended (${bytes} bytes of volatile state stored)`);
      return bytes;
    }
    case 'exit':
      for (const [name, e] of engines) {
        unserve(e);
        engines.delete(name);
        e.tpm.stop();
      }
      return undefined;
  }
}

function drainControl(): void {
  for (let r = receiveMessageOnPort(wd.port); r; r = receiveMessageOnPort(wd.port)) {
    const m = r.message as GroupWorkerRequest;
    try {
      const bytes = handle(m);
      post({ ev: 'reply', id: m.id, ok: true, ...(bytes === undefined ? {} : { bytes }) });
    } catch (e) {
      post({ ev: 'reply', id: m.id, ok: false, error: errorToWire(e) });
    }
    if (m.op === 'exit') process.exit(0); // ends this thread only (the process follows)
  }
}

/** A guest's channel closed (its front end went away, or its back end was closed): the
 *  mux has dropped the slot; the engine keeps running for the next connection. */
function closed(slot: number): void {
  const s = bySlot.get(slot);
  if (!s) return;
  bySlot.delete(slot);
  s.back.detach();
  const e = engines.get(s.name);
  if (e && e.slot === slot) e.slot = -1;
  if (!s.stale) post({ ev: 'closed', name: s.name });
}

function serveSlot(slot: number): void {
  const s = bySlot.get(slot);
  if (!s || s.stale) return;
  // 'closed' needs nothing here: the mux reports the slot's close by itself
  s.back.serveReady(s.tpm.handle);
}

/** Mux failures in a row (other than a closed port) before the thread gives up: one is
 *  one slot's trouble, a run of them means the mux itself is broken. */
const MUX_FAILURES = 16;
let failures = 0;

post({ ev: 'up' });
dropStartupGarbage();
for (;;) {
  let n: number;
  try {
    n = mux.waitAny();
    failures = 0;
  } catch (e) {
    if (e instanceof EvtchnClosedError) closed(e.slot);
    // interruptFrom: the process is going down hard (a sibling thread crashed)
    else if (isVtpmError(e, 'ECANCELED')) process.exit(1);
    else if (++failures >= MUX_FAILURES) throw e;
    else log(`event-channel wait: ${describeError(e)}`);
    continue;
  }
  for (let i = 0; i < n; i++) {
    const slot = mux.ready[i]!;
    try {
      if (slot === controlSlot) drainControl();
      else serveSlot(slot);
    } catch (e) {
      // one engine's trouble is its own: the thread goes on serving the others
      log(`slot ${slot}: ${describeError(e)}`);
    }
  }
}
