// The rollback anchor on the emulated hardware TPM: an NV monotonic counter defined at first
// open, increments that survive a power cycle (orderly or not), never going down (not even by
// undefining and re-defining the index), and an index pre-defined with other attributes refused.
import t from 'tap';
import * as path from 'node:path';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPMA_NV, TPM_ALG } from '../../drivers/tpm/tpm2-structures.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { COUNTER_ATTRIBUTES, MANAGER_COUNTER_INDEX, openCounter } from '../../manager/hardware/counter.ts';
import { hardwareClient } from '../../manager/hardware/client.ts';
import { loadedHandles, medianMs, openChip, tempDir } from './hw-chip.ts';

const dir = tempDir(t, 'vtpm-counter-');
const host = path.join(dir, 'host');
let hw: HardwareTpm | undefined;
t.teardown(async () => {
  await hw?.close();
});

async function boot(stateDir = host, orderly = true): Promise<HardwareTpm> {
  if (hw && orderly) await new Tpm2Client(hw).shutdown(false);
  await hw?.close();
  hw = await openChip(stateDir);
  return hw;
}

t.test('defined at first open, counts up, survives power cycles', async (t) => {
  let tpm = await boot();
  const c = await openCounter(tpm);
  t.equal(c.index, MANAGER_COUNTER_INDEX, 'the default index');
  t.equal(c.created, true, 'defined at first open');
  const pub = (await (await hardwareClient(tpm)).nvEntity(MANAGER_COUNTER_INDEX)).public;
  t.equal(pub.attributes & ~TPMA_NV.WRITTEN, COUNTER_ATTRIBUTES, 'counter attributes');
  t.ok(pub.attributes & TPMA_NV.WRITTEN, 'written (readable) from the start');
  const v0 = await c.read();
  const v1 = await c.increment();
  t.equal(v1, v0 + 1n, 'increment returns the new value');
  t.equal(await c.read(), v1, 'read agrees');
  const ms = await medianMs(10, () => c.increment());
  t.comment(`counter increment (NV_Increment + NV_Read) on the emulated chip: median ${ms.toFixed(2)} ms of 10`);
  const v2 = await c.read();
  t.equal(v2, v1 + 10n, 'ten more');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded');

  tpm = await boot(); // orderly: Shutdown, close, reopen from the NVRAM dir
  const again = await openCounter(tpm);
  t.equal(again.created, false, 'found, not defined again');
  t.equal(await again.read(), v2, 'value survived an orderly power cycle');
  const v3 = await again.increment();

  tpm = await boot(host, false); // power cut: no Shutdown
  const afterCut = await openCounter(tpm);
  t.ok((await afterCut.read()) >= v3, 'never below the last value after a power cut');
  t.equal(await afterCut.increment(), (await afterCut.read()), 'and keeps counting');
});

t.test('never goes down, not even when the index is undefined and defined again', async (t) => {
  const tpm = await boot();
  const c = await openCounter(tpm);
  let last = await c.read();
  for (let i = 0; i < 5; i++) {
    const v = await c.increment();
    t.ok(v > last, `increment ${i} went up`);
    last = v;
  }
  const client = await hardwareClient(tpm);
  await client.nvUndefineSpace(MANAGER_COUNTER_INDEX); // what an owner could do to try a reset
  const fresh = await openCounter(tpm);
  t.equal(fresh.created, true, 'defined anew');
  t.ok((await fresh.read()) >= last, `a re-defined counter starts at ${await fresh.read()}, not below ${last}`);
});

t.test('an index pre-defined with other attributes is refused', async (t) => {
  const tpm = await boot(path.join(dir, 'other-host'));
  const client = await hardwareClient(tpm);
  const a = TPMA_NV;
  // An ordinary 8-byte index: whoever defined it can write any value into it (a reset).
  await client.nvDefineSpace({ index: MANAGER_COUNTER_INDEX, nameAlg: TPM_ALG.SHA256, attributes: a.OWNERWRITE | a.OWNERREAD | a.AUTHREAD | a.AUTHWRITE | a.NO_DA, authPolicy: new Uint8Array(0), dataSize: 8 });
  await client.nvWrite(MANAGER_COUNTER_INDEX, new Uint8Array(8));
  await t.rejects(openCounter(tpm), { code: 'EPERM', message: /NV index 0x01000100 exists but is not the manager's monotonic counter \(attributes 0x[0-9a-f]+ .*possibly to be able to reset it/ });
  await client.nvUndefineSpace(MANAGER_COUNTER_INDEX);

  // A counter, but one its definer could delete with a policy of its own: also refused.
  const other = 0x01000101;
  await client.nvDefineSpace({ index: other, nameAlg: TPM_ALG.SHA256, attributes: COUNTER_ATTRIBUTES, authPolicy: new Uint8Array(32).fill(7), dataSize: 8 });
  await t.rejects(openCounter(tpm, other), { code: 'EPERM', message: /an authorisation policy/ });

  await t.rejects(openCounter(tpm, 0x01c00002), { code: 'EINVAL', message: /not in the owner range/ }, 'TCG EK certificate range refused');
  const ok = await openCounter(tpm, 0x01000102);
  t.equal(ok.created, true, 'another free index is fine');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded');
});
