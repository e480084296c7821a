// Acceptance: the tpm2-tools battery against a TPM 2.0 guest's tpm0, on both FUSE front
// ends; the same battery proven against swtpm in test/clients.
import t from 'tap';
import { existsSync } from 'node:fs';
import { runTpm2Battery } from '../clients/tpm2-battery.ts';
import { TestHost, vtpm } from './host.ts';

for (const fuse of ['raw', 'native'] as const) {
  t.test(`tpm2-tools battery through tpm0 (${fuse} front end)`, async (t) => {
    const host = new TestHost(t);
    const node = await host.start(t, `g-${fuse}`, '2.0', fuse);
    await runTpm2Battery(t, `device:${node}`);
  });
}

t.test('vtpm exec: a program that opens /dev/tpm0 itself reaches the guest, the host /dev is untouched', async (t) => {
  const host = new TestHost(t);
  await host.start(t, 'ex', '2.0');
  const hostHadTpm0 = existsSync('/dev/tpm0');
  // The TCTI is left to its default of /dev/tpm0, as on a machine with a real TPM.
  const r = await vtpm(['exec', 'ex', ...host.args, '--', 'sh', '-c', 'ls -l /dev/tpm0 && TPM2TOOLS_TCTI=device:/dev/tpm0 tpm2_getrandom --hex 12']);
  t.equal(r.code, 0, `exit 0${r.code ? `: ${r.stderr}` : ''}`);
  t.match(r.stdout, /tpm0/, 'the namespace shows /dev/tpm0');
  t.match(r.stdout, /[0-9a-f]{24}\s*$/, '12 random bytes from the guest');
  t.equal(existsSync('/dev/tpm0'), hostHadTpm0, 'the host /dev is as it was');
  const bad = await vtpm(['exec', 'ex', ...host.args, '--', 'sh', '-c', 'exit 7']);
  t.equal(bad.code, 7, "the command's exit status is exec's");
});
