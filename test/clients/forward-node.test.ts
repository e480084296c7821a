// Proves the batteries' device paths on a reference TPM: swtpm behind a minimal FUSE tpm0
// (test/clients/fuse-forward.ts). TPM 2.0 through tpm2-tss' device TCTI; TPM 1.2 through
// tcsd in a private mount namespace with the FUSE file bind-mounted at /dev/tpm0.

import t from 'tap';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mountForwardNode } from './fuse-forward.ts';
import { scratchDir } from './run.ts';
import { startSwtpm } from './swtpm.ts';
import { startTcsd } from './tcsd.ts';
import { runTpm12Battery } from './tpm12-battery.ts';
import { runTpm2Battery } from './tpm2-battery.ts';

// Mounts the namespace recipe could leak onto the host: /dev and below (what else mounts
// meanwhile, e.g. another test's node under /tmp, is not this test's business).
const hostMounts = (): string =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => /^\S+ \S+ \S+ \S+ \/dev(\/| )/.test(l))
    .join('\n');
const hadTpm0 = existsSync('/dev/tpm0');

t.test('tpm2-tools battery through a FUSE tpm0 (device TCTI) to swtpm --tpm2', async (t) => {
  const tpm = await startSwtpm(t, '2.0');
  const node = await mountForwardNode(t, tpm);
  await runTpm2Battery(t, `device:${node.path}`);
});

t.test('tpm-tools battery through tcsd in a mount namespace, FUSE tpm0 to swtpm 1.2', async (t) => {
  const tpm = await startSwtpm(t, '1.2');
  const node = await mountForwardNode(t, tpm);
  const before = hostMounts();
  await t.test('battery', (t) => runTpm12Battery(t, node.path));
  t.equal(existsSync('/dev/tpm0'), hadTpm0, 'host /dev unchanged (no tpm0 appeared or vanished)');
  t.equal(hostMounts(), before, 'no mount made in the host namespace');
});

t.test('tcsd in the namespace on a node that is not a TPM fails at start, with its reason', async (t) => {
  const notTpm = join(scratchDir(t, 'nottpm'), 'tpm0');
  writeFileSync(notTpm, '', { mode: 0o600 });
  await t.rejects(startTcsd(t, { node: notTpm }), /tcsd exited[\s\S]*Zero bytes read from device \/dev\/tpm0/, 'tcsd read /dev/tpm0 (the bound file) and gave up');
  await t.rejects(startTcsd(t, { node: join(notTpm, 'missing') }), /does not exist/, 'a missing node is refused before tcsd starts');
});
