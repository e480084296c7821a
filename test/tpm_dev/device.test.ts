// The device driver against a tpm0 node this project serves (the guest data path's FUSE
// node of an instance started through the host's manager): the same client battery as through the TIS
// driver, EBUSY for a second opener, and `vtpm hw info --hw device:PATH`.
import t from 'tap';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';
import { clientBattery } from '../tpm/tpm2-client-battery.ts';

const run = promisify(execFile);
const root = path.resolve(import.meta.dirname, '../..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-dev-node-'));
const vtpm = (...args: string[]) => run(process.execPath, ['--import', 'tsx', path.join(root, 'scripts/vtpm.ts'), ...args], { cwd: root, timeout: 120_000 });

let node = '';
const runDir = ['--run-dir', path.join(dir, 'run')];
t.before(async () => {
  await vtpm('host', 'start', ...runDir, '--state-dir', path.join(dir, 'state'), '--hw', `tis:${path.join(dir, 'hwtpm')}`);
  await vtpm('create', 'hwdev', '--tpm', '2.0', ...runDir);
  const { stdout } = await vtpm('start', 'hwdev', ...runDir);
  node = stdout.trim().split('\n').pop()!;
});
t.teardown(async () => {
  // Stops the manager (its instance: front unmounts the node, vtpmd) and the authority.
  try {
    await vtpm('host', 'stop', ...runDir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

t.test('client battery through the device node; EBUSY for a second opener', async (t) => {
  const dev = await TpmDevice.open(node);
  try {
    await t.rejects(TpmDevice.open(node), { code: 'EBUSY', message: /EBUSY/ }, 'tpm-dev: one opener at a time');
    const c = new Tpm2Client(dev);
    t.equal(await c.startup(), false, 'the vTPM was started up when the guest started');
    await clientBattery(t, c, { dir, counterIndex: 0x01500030 });
  } finally {
    await dev.close();
  }
});

t.test('vtpm hw info --hw device:NODE', async (t) => {
  const { stdout } = await vtpm('hw', 'info', '--hw', `device:${node}`, '--json');
  const info = JSON.parse(stdout) as { manufacturer: string; startedNow: boolean; banks: { alg: string }[] };
  t.equal(info.manufacturer, 'IBM');
  t.equal(info.startedNow, false);
  t.ok(info.banks.some((b) => b.alg === 'sha256'), 'sha256 bank');
});
