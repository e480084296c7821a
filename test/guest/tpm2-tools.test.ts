// Acceptance: the tpm2-tools battery against a TPM 2.0 guest's tpm0, on both FUSE front
// ends; the same battery proven against swtpm in test/clients.
import t from 'tap';
import { runTpm2Battery } from '../clients/tpm2-battery.ts';
import { TestHost } from './host.ts';

for (const fuse of ['raw', 'native'] as const) {
  t.test(`tpm2-tools battery through tpm0 (${fuse} front end)`, async (t) => {
    const host = new TestHost(t);
    const node = await host.start(t, `g-${fuse}`, '2.0', fuse);
    await runTpm2Battery(t, `device:${node}`);
  });
}
