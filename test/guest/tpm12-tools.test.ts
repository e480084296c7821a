// Acceptance: tpm-tools through the trousers daemon against a TPM 1.2 guest's tpm0
// (tcsd in a private mount namespace with the node bind-mounted over /dev/tpm0).
import t from 'tap';
import { runTpm12Battery } from '../clients/tpm12-battery.ts';
import { TestHost } from './host.ts';

for (const fuse of ['raw', 'native'] as const) {
  t.test(`tpm-tools battery through tcsd and tpm0 (${fuse} front end)`, async (t) => {
    const host = new TestHost(t);
    const node = await host.start(t, `g12-${fuse}`, '1.2', fuse);
    await runTpm12Battery(t, node);
  });
}
