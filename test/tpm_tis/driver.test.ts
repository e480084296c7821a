// The TIS driver against the model and the emulated chip: both wait modes, serialisation,
// and the spec timeouts turning into typed errors instead of hangs.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TisDriver } from '../../drivers/tpm_tis/driver.ts';
import { startEmulatedTpmChip } from '../../drivers/hwtpm/open.ts';
import type { TisModel } from '../../drivers/tpm_tis/model.ts';
import { ACCESS, REG } from '../../drivers/tpm_tis/regs.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-tis-driver-'));
let m: TisModel;
t.before(async () => {
  m = await startEmulatedTpmChip({ stateDir: dir });
});
t.teardown(async () => {
  await m?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

t.test('interrupt-driven driver: startup, commands in order, concurrent callers serialised', async (t) => {
  const d = new TisDriver(m, { irq: m.irq });
  t.same(await d.transmit(tpm2.startup()), new Uint8Array([0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]), 'Startup answered');
  const all = await Promise.all(Array.from({ length: 10 }, (_, i) => d.transmit(tpm2.getRandom(i + 1))));
  all.forEach((r, i) => t.equal(tpm2.parseGetRandom(r).length, i + 1, `caller ${i} got its own response`));
  const pcr = tpm2.parsePcrRead(await d.transmit(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [0] }])));
  t.same(pcr.digests, [new Uint8Array(32)], 'PCR 0 reads zero');
  t.equal(m.active, -1, 'locality released after each command');
  t.equal(m.read32(REG.INT_STATUS), 0, 'its interrupt status acknowledged before the release');
});

t.test('polled driver (no interrupt line), at locality 2', async (t) => {
  const d = new TisDriver(m, { locality: 2, spinUs: 0 });
  t.equal(tpm2.parseGetRandom(await d.transmit(tpm2.getRandom(16))).length, 16);
  t.equal(tpm2.parseGetRandom(await d.transmit(tpm2.getRandom(16), 4)).length, 16, 'per-command locality');
});

t.test('a locality that is never granted times out (TIMEOUT_A) and withdraws its request', async (t) => {
  m.write8(3 * 0x1000 + REG.ACCESS, ACCESS.requestUse); // someone else holds the TPM
  const d = new TisDriver(m, { irq: m.irq });
  const t0 = Date.now();
  const cpu0 = process.cpuUsage();
  await t.rejects(d.transmit(tpm2.getRandom(4)), { code: 'ETIMEDOUT', message: /locality 0 not granted within 750 ms/ });
  const cpu = process.cpuUsage(cpu0);
  t.ok(Date.now() - t0 >= 700, 'waited the spec timeout');
  t.ok(cpu.user + cpu.system < 300_000, `without burning a core (${Math.round((cpu.user + cpu.system) / 1000)} ms CPU in 750 ms)`);
  t.notOk(m.read8(REG.ACCESS) & ACCESS.requestUse, 'request withdrawn');
  m.write8(3 * 0x1000 + REG.ACCESS, ACCESS.activeLocality);
  t.equal(tpm2.parseGetRandom(await d.transmit(tpm2.getRandom(4))).length, 4, 'works once the TPM is free');
});

t.test('bad input is refused before touching the registers', async (t) => {
  const d = new TisDriver(m, { irq: m.irq });
  await t.rejects(d.transmit(new Uint8Array(5)), { code: 'EINVAL' });
  await t.rejects(d.transmit(new Uint8Array(4097)), { code: 'EINVAL' });
  await t.rejects(d.transmit(tpm2.getRandom(4), 5), { code: 'EINVAL' });
  await d.close();
  await t.rejects(d.transmit(tpm2.getRandom(4)), { code: 'ECLOSED' });
});

t.test('a powered-off register file gives a typed timeout (TIMEOUT_A), not a hang', async (t) => {
  const d = new TisDriver(m, { irq: m.irq });
  await m.close();
  await t.rejects(d.transmit(tpm2.getRandom(4)), { code: 'ETIMEDOUT', message: /not granted within 750 ms/ });
});
