// Acceptance: tpm-tools through the trousers daemon against a TPM 1.2 guest's tpm0
// (tcsd in a private mount namespace with the node bind-mounted over /dev/tpm0), and the
// owner state (SRK) across a whole-host restart.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { runTpm12Battery, Tpm12Tools } from '../clients/tpm12-battery.ts';
import { startTcsd } from '../clients/tcsd.ts';
import { TestHost, vtpm } from './host.ts';

for (const fuse of ['raw', 'native'] as const) {
  t.test(`tpm-tools battery through tcsd and tpm0 (${fuse} front end)`, async (t) => {
    const host = new TestHost(t);
    const node = await host.start(t, `g12-${fuse}`, '1.2', fuse);
    await runTpm12Battery(t, node);
  });
}

t.test('TPM 1.2 owner state survives a whole-host restart: data sealed to the SRK before it unseals after', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'own12', '1.2');
  const tcsd = await startTcsd(t, { node });
  const tools = new Tpm12Tools(tcsd, 60_000);
  if ((await tools.try('tpm_getpubek', [])).code !== 0) await tools.run('tpm_createek', []);
  await tools.run('tpm_takeownership', ['-y', '-z']);
  const secret = Buffer.from('owned before the host restart');
  const sealed = tools.file('sealed');
  await tools.run('tpm_sealdata', ['-i', tools.writeFile('secret', secret), '-o', sealed, '-z']);
  await tcsd.stop();
  const systemPs = readFileSync(tcsd.systemPsFile); // the guest's /var/lib/tpm

  await host.hostRestart(t);
  const r = await vtpm(['start', 'own12', ...host.args], 120_000);
  t.equal(r.code, 0, `vtpm start after the host restart${r.code ? `: ${r.stderr}` : ''}`);
  const after = new Tpm12Tools(await startTcsd(t, { node }, { systemPs }), 60_000);
  const again = await after.try('tpm_takeownership', ['-y', '-z']);
  t.not(again.code, 0, 'still owned: a second takeownership is refused');
  const out = after.file('unsealed');
  const un = await after.try('tpm_unsealdata', ['-i', after.writeFile('sealed', readFileSync(sealed)), '-o', out, '-z']);
  t.equal(un.code, 0, `tpm_unsealdata after the restart${un.code ? `: ${un.stdout}${un.stderr}` : ''}`);
  t.equal(un.code === 0 ? readFileSync(out).toString() : '', secret.toString(), 'the same SRK unseals the secret');
});
