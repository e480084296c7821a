// `vtpm start NAME --qemu` speaks the swtpm control protocol to a real client (swtpm_ioctl),
// with the manager behind it: INIT, capabilities, info, locality; state blobs it exports
// are sealed for this instance (not libtpms' plain bytes) and load back into it; a plain
// blob or one sealed for another instance is refused; vtpm stop ends it orderly.
import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { scratchDir, type Tap } from '../clients/run.ts';
import { ioctl } from '../swtpm_ctrl/helpers.ts';
import { TestHost, vtpm } from './host.ts';

async function startQemu(t: Tap, host: TestHost, name: string): Promise<string> {
  t.equal((await vtpm(['create', name, ...host.args])).code, 0, `vtpm create ${name}`);
  const s = await vtpm(['start', name, '--qemu', '--json', ...host.args], 120_000);
  t.equal(s.code, 0, `vtpm start ${name} --qemu${s.code ? `: ${s.stderr}` : ''}`);
  return (JSON.parse(s.stdout) as { ctrl: string }).ctrl;
}

t.test('swtpm_ioctl against a manager-run vTPM for QEMU', async (t) => {
  const host = new TestHost(t);
  await host.hostStart();
  const ctrl = await startQemu(t, host, 'q1');
  const other = await startQemu(t, host, 'q2');
  const dir = scratchDir(t, 'ioctl');

  const caps = await ioctl(ctrl, '-c');
  t.equal(caps.code, 0, `-c (capabilities)${caps.code ? `: ${caps.stderr}` : ''}`);
  t.match(caps.stdout, /ptm capability is 0x[0-9a-f]+/i, 'capabilities reported');
  t.equal((await ioctl(ctrl, '-i')).code, 0, '-i (INIT: the TPM powers on from its manager-held state)');
  const info = await ioctl(ctrl, '--info', '1');
  t.equal(info.code, 0, '--info');
  t.match(info.stdout, /TPMSpecification/, "libtpms' description of itself");
  t.equal((await ioctl(ctrl, '-l', '2')).code, 0, '-l 2 (locality)');

  const perm = join(dir, 'perm');
  const save = await ioctl(ctrl, '--save', 'permanent', perm);
  t.equal(save.code, 0, `--save permanent${save.code ? `: ${save.stderr}` : ''}`);
  const blob = readFileSync(perm);
  t.ok(blob.length > 100, `a permanent blob came out (${blob.length} bytes)`);
  t.equal((await ioctl(ctrl, '--stop')).code, 0, '--stop');
  t.equal((await ioctl(ctrl, '--load', 'permanent', perm)).code, 0, 'the sealed blob loads back into its instance');
  t.equal((await ioctl(ctrl, '-i')).code, 0, 'and the TPM starts from it');

  // The same bytes into another instance, and a tampered copy, are refused.
  t.equal((await ioctl(other, '--stop')).code, 0, 'q2 stopped for loading');
  t.not((await ioctl(other, '--load', 'permanent', perm)).code, 0, "q1's blob is refused by q2 (sealed for q1)");
  const bad = join(dir, 'bad');
  const flipped = Buffer.from(blob);
  flipped[flipped.length - 1]! ^= 1;
  writeFileSync(bad, flipped);
  t.equal((await ioctl(ctrl, '--stop')).code, 0, 'q1 stopped again');
  t.not((await ioctl(ctrl, '--load', 'permanent', bad)).code, 0, 'an altered blob is refused');
  t.equal((await ioctl(ctrl, '-i')).code, 0, 'q1 still starts from its own state');

  const stop = await vtpm(['stop', 'q1', ...host.args], 60_000);
  t.equal(stop.code, 0, 'vtpm stop of a QEMU instance');
  t.equal((await host.row('q1')).state, 'stopped', 'it is stopped');
});
