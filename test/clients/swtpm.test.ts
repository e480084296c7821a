// Proves the client batteries on a reference TPM (swtpm) before they judge our nodes: a
// battery that fails here is wrong itself, not the node under test.

import t from 'tap';
import { runTpm2Battery } from './tpm2-battery.ts';
import { runTpm12Battery } from './tpm12-battery.ts';
import { startSwtpm } from './swtpm.ts';

t.test('tpm2-tools battery against swtpm --tpm2 (TCP TCTI)', async (t) => {
  const tpm = await startSwtpm(t, '2.0');
  await t.test('first run', (t) => runTpm2Battery(t, tpm.tcti));
  // the battery cleans up after itself: a second run on the same TPM passes too
  await t.test('second run on the same TPM', (t) => runTpm2Battery(t, tpm.tcti));
});

// tcsd cannot open a TCP TPM as /dev/tpm0 and this machine has no CUSE, so here tcsd
// reaches swtpm through its own TCP device switch; the namespace path that our nodes
// use is exercised by tpm12-node.test.ts.
t.test('tpm-tools battery through tcsd against swtpm (TPM 1.2, tcsd TCP device)', async (t) => {
  const tpm = await startSwtpm(t, '1.2');
  await runTpm12Battery(t, { tcp: { host: tpm.host, port: tpm.port } });
});
