// Test daemon: the manager's end of one state link, as a real domain process. Started with
// startDaemon (drivers/host/daemon.ts); reports {domid} once its xenbus back end waits.
//
//   tsx link-server.ts --dir AUTHDIR --front DOMID [--devid N] --uuid UUID
//                      --backend instance|dir --state DIR [--key HEX] --serverlog FILE
//
// The back end's worker (serve-worker.ts) runs TpmifBack.serveSync(stateLinkHandler(...))
// over an InstanceStore (the manager's encrypted store) or a DirStateStore. SIGUSR2 stops
// serving (the link stays up, nobody answers); SIGTERM exits.
import { parseArgs } from 'node:util';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { reportFailure, reportReady } from '../../drivers/host/daemon.ts';
import { startWorker } from '../../drivers/base/modules.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { TpmifBack } from '../../drivers/tpmback/tpmif-back.ts';
import { XenbusBack, type BackLink } from '../../drivers/tpmback/xenbus-back.ts';
import type { ServeWorkerData } from './serve-worker.ts';

const here = path.dirname(fileURLToPath(import.meta.url));

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      dir: { type: 'string' }, front: { type: 'string' }, devid: { type: 'string' }, uuid: { type: 'string' },
      backend: { type: 'string' }, state: { type: 'string' }, key: { type: 'string' }, serverlog: { type: 'string' },
    },
  });
  const dom = await Domain.join(a.dir!, { name: 'statelink-manager' });
  const xb = await XenbusBack.start(dom, { frontId: Number(a.front), devid: Number(a.devid ?? 0), uuid: a.uuid! });
  let serving: BackLink | null = null;
  xb.onConnect((link) => {
    serving = link;
    const wd: ServeWorkerData = { params: link.params, uuid: a.uuid!, backend: a.backend === 'dir' ? 'dir' : 'instance', state: a.state!, key: a.key ?? '', log: a.serverlog! };
    const worker = startWorker(path.join(here, 'serve-worker.ts'), { workerData: wd });
    worker.on('message', (m) => console.error(`serve loop ended: ${JSON.stringify(m)}`));
  });
  process.on('SIGUSR2', () => {
    if (serving) TpmifBack.stopFrom(serving.params);
  });
  // The serve loop ends by itself ('closed') when the front end closes the channel. No
  // stopFrom() at exit: the channel record may be free by then, or already reused by the
  // next link, whose serve loop the interrupt flag would end.
  xb.onDisconnect(() => {
    serving = null;
  });
  process.on('SIGTERM', () => process.exit(0));
  reportReady({ ok: true, info: { domid: dom.domid } });
}

main().catch((e) => {
  console.error(e);
  reportFailure(e);
  process.exit(1);
});
