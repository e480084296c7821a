// The TPM 2.0 client battery through the TIS driver and register model, on the emulated
// chip (libtpms in a worker) with its NVRAM in a temp state dir; then a restart of the
// model from that dir keeps the NV counter.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { openEmulatedTpm } from '../../drivers/hwtpm/open.ts';
import type { TisDriver } from '../../drivers/tpm_tis/driver.ts';
import { clientBattery } from './tpm2-client-battery.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-client-tis-'));
const stateDir = path.join(dir, 'chip');
let tpm: TisDriver | undefined;
t.teardown(async () => {
  await tpm?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function open(): Promise<Tpm2Client> {
  tpm = await openEmulatedTpm({ stateDir });
  const c = new Tpm2Client(tpm);
  t.equal(await c.startup(), true, 'Startup(CLEAR) after power-on');
  return c;
}

const COUNTER = 0x01500010;

t.test('response codes decode with their handle, session or parameter number', async (t) => {
  const c = await open();
  await t.rejects(c.startAuthSession({ type: 0x07, symmetric: false }), { code: 'ETPM', message: /TPM_RC_VALUE \(parameter 3\) \(0x3c4\)/ }, 'bad sessionType');
  await t.rejects(c.readPublic(0x80ffff00), { code: 'ETPM', message: /TPM_RC_VALUE \(handle 1\) \(0x184\)/ }, 'handle out of the transient range');
  await t.rejects(c.getCapability(0x77, 0, 1), { code: 'ETPM', message: /TPM_RC_VALUE \(parameter 1\)/ }, 'bad capability');
  t.equal(await c.startup(), false, 'second Startup: TPM_RC_INITIALIZE, taken as "already started"');
  await tpm!.close();
  tpm = undefined;
});

t.test('client battery through the TIS driver, counter survives a restart', async (t) => {
  let c = await open();
  const counter = await clientBattery(t, c, { dir, counterIndex: COUNTER });

  await c.shutdown(false);
  await tpm!.close();
  tpm = undefined;
  t.ok(fs.readdirSync(stateDir).length > 0, 'chip NVRAM is in the state dir');
  t.equal(fs.statSync(stateDir).mode & 0o777, 0o700, 'state dir 0700');
  for (const f of fs.readdirSync(stateDir)) t.equal(fs.statSync(path.join(stateDir, f)).mode & 0o777, 0o600, `${f} is 0600`);

  c = await open();
  t.equal(await c.nvReadCounter(COUNTER), counter, 'counter value survived the restart');
  await c.nvIncrement(COUNTER);
  t.equal(await c.nvReadCounter(COUNTER), counter + 1n, 'and keeps counting');
});
