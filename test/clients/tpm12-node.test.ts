// The TPM 1.2 battery on our own tpm0: tpmfront's FUSE node (raw front end) with the
// in-worker libtpms engine backend, reached by tcsd through its mount namespace.
// (libtpms keeps global state: one engine per process, so this file runs 1.2 only.)

import t from 'tap';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import { mountTpmNode } from '../../drivers/tpmfront/mount.ts';
import { scratchDir } from './run.ts';
import { runTpm12Battery } from './tpm12-battery.ts';

t.test('tpm-tools battery through tcsd on a tpmfront tpm0 (TPM 1.2 engine)', async (t) => {
  const dir = scratchDir(t, 'tpm12-node');
  const node = await mountTpmNode({ dir: join(dir, 'dev'), frontEnd: 'raw', backend: engineBackendSpec({ version: '1.2' }), handleSignals: false });
  t.teardown(() => node.close());
  t.equal(node.rmPath, undefined, 'a TPM 1.2 node has no tpmrm0 (Linux gives only TPM 2.0 chips one)');
  t.same(await readdir(join(dir, 'dev')), ['tpm0'], 'only tpm0 in the node dir');
  await runTpm12Battery(t, node.path);
});
