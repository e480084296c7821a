// The TPM 2.0 battery (tpm2-tools, device TCTI) through our own tpm0, for each front end
// kind (test/tpmfront/node-kinds.ts): the raw FUSE node with the libtpms engine in its
// worker, and a node served by frontd with its own vtpmd. No resource manager behind tpm0:
// the battery flushes between steps. (libtpms keeps global state: one raw node here.)

import t from 'tap';
import { mountKind } from '../tpmfront/node-kinds.ts';
import { scratchDir } from './run.ts';
import { runTpm2Battery } from './tpm2-battery.ts';

for (const kind of ['raw', 'frontd'] as const) {
  t.test(`tpm2-tools battery through a ${kind} tpm0`, async (t) => {
    const { node, cleanup } = await mountKind(kind, scratchDir(t, `tpm2-node-${kind}`));
    t.teardown(cleanup);
    await runTpm2Battery(t, `device:${node.path}`);
  });
}
