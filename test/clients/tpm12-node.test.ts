// The TPM 1.2 battery on our own tpm0, reached by tcsd through its mount namespace, for each
// front end kind (test/tpmfront/node-kinds.ts): tpmfront's raw FUSE node with the in-worker
// libtpms engine backend, and a node served by frontd (the per-host front-end process) with
// its own vtpmd. (libtpms keeps global state: one engine per process, so this file runs 1.2
// only; frontd's engine is in its vtpmd.)

import t from 'tap';
import { readdir } from 'node:fs/promises';
import { mountKind } from '../tpmfront/node-kinds.ts';
import { scratchDir } from './run.ts';
import { runTpm12Battery } from './tpm12-battery.ts';

for (const kind of ['raw', 'frontd'] as const) {
  t.test(`tpm-tools battery through tcsd on a ${kind} tpm0 (TPM 1.2 engine)`, async (t) => {
    const dir = scratchDir(t, `tpm12-node-${kind}`);
    const { node, cleanup } = await mountKind(kind, dir, { tpm: '1.2' });
    t.teardown(cleanup);
    t.equal(node.rmPath, undefined, 'a TPM 1.2 node has no tpmrm0 (Linux gives only TPM 2.0 chips one)');
    t.same(await readdir(node.dir), ['tpm0'], 'only tpm0 in the node dir');
    await runTpm12Battery(t, node.path);
  });
}
