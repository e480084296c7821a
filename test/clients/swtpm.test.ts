// Proves the client batteries on a reference TPM (swtpm) before they judge our nodes: a
// battery that fails here is wrong itself, not the node under test.

import t from 'tap';
import { runTpm2Battery } from './tpm2-battery.ts';
import { startSwtpm } from './swtpm.ts';

t.test('tpm2-tools battery against swtpm --tpm2 (TCP TCTI)', async (t) => {
  const tpm = await startSwtpm(t, '2.0');
  await t.test('first run', (t) => runTpm2Battery(t, tpm.tcti));
  // the battery cleans up after itself: a second run on the same TPM passes too
  await t.test('second run on the same TPM', (t) => runTpm2Battery(t, tpm.tcti));
});
