// Worker thread for mux.test.ts: one EvtchnMux over the ports it is given, reporting what
// each waitAny returns. Slot 0 is the control port: when it is ready the worker reads the
// test's commands ({op: 'mask'|'unmask', slot} | {op: 'timeout', ms}) from its port.
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { EvtchnMux, EvtchnClosedError } from '../../drivers/xen/evtchn-mux.ts';
import type { EvtchnParams } from '../../drivers/xen/evtchn.ts';
import { isVtpmError } from '../../drivers/base/errors.ts';

const wd = workerData as { params: EvtchnParams[]; control: MessagePort };
const mux = new EvtchnMux();
const slots = wd.params.map((p) => mux.add(p));
let timeoutMs = Infinity;
parentPort!.postMessage({ up: slots });
for (;;) {
  let n: number;
  try {
    n = mux.waitAny(timeoutMs);
  } catch (e) {
    if (!isVtpmError(e)) throw e;
    parentPort!.postMessage({ err: e.code, slot: e instanceof EvtchnClosedError ? e.slot : -1 });
    if (e.code === 'ECANCELED') break;
    continue;
  }
  if (n === 0) {
    parentPort!.postMessage({ timeout: true });
    continue;
  }
  const got: number[] = [];
  for (let i = 0; i < n; i++) {
    const slot = mux.ready[i]!;
    if (slot !== slots[0]) {
      got.push(slot);
      continue;
    }
    for (let m = receiveMessageOnPort(wd.control); m; m = receiveMessageOnPort(wd.control)) {
      const c = m.message as { op: string; slot?: number; ms?: number };
      if (c.op === 'mask') mux.mask(c.slot!);
      else if (c.op === 'unmask') mux.unmask(c.slot!);
      else if (c.op === 'timeout') timeoutMs = c.ms!;
    }
    parentPort!.postMessage({ control: true });
  }
  if (got.length) parentPort!.postMessage({ ready: got });
}
mux.close();
parentPort!.postMessage({ done: true });
