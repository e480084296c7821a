// Worker thread for mux-tpmif.test.ts: serves every tpmif back end it is given from one
// EvtchnMux, each channel on one of `engines` real libtpms engines (private library copies;
// channel i on engine i % engines). Ends when every channel closed or on a stop; posts
// {served, closed, perEngine, why}.
import { parentPort, workerData } from 'node:worker_threads';
import { TpmifBack } from '../../drivers/tpmback/tpmif-back.ts';
import { EvtchnMux, EvtchnClosedError } from '../../drivers/xen/evtchn-mux.ts';
import type { TpmifParams } from '../../drivers/xen/tpmif-page.ts';
import { createEngineBackend } from '../../drivers/libtpms/engine-backend.ts';
import { isVtpmError } from '../../drivers/base/errors.ts';

const wd = workerData as { links: TpmifParams[]; engines: number };
const engines = Array.from({ length: wd.engines }, () => createEngineBackend({ version: '2.0', privateCopy: true }));
const mux = new EvtchnMux();
const backs: TpmifBack[] = [];
const engineOf: number[] = [];
wd.links.forEach((p, i) => {
  const slot = mux.add(p.evtchn);
  backs[slot] = TpmifBack.attach(p);
  engineOf[slot] = i % wd.engines;
});
parentPort!.postMessage({ up: true });
const perEngine = new Array<number>(wd.engines).fill(0);
let served = 0;
let closed = 0;
let why = 'all closed';
while (closed < wd.links.length) {
  let n: number;
  try {
    n = mux.waitAny();
  } catch (e) {
    if (e instanceof EvtchnClosedError) {
      closed++;
      continue;
    }
    if (isVtpmError(e, 'ECANCELED')) {
      why = 'stopped';
      break;
    }
    throw e;
  }
  for (let i = 0; i < n; i++) {
    const slot = mux.ready[i]!;
    const engine = engines[engineOf[slot]!]!;
    backs[slot]!.serveReady((cmd, locality) => {
      served++;
      perEngine[engineOf[slot]!]!++;
      return engine.transmitSync(cmd, locality);
    });
  }
}
mux.close();
for (const e of engines) e.close();
parentPort!.postMessage({ served, closed, perEngine, why });
