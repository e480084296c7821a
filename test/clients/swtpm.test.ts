// Proves the client batteries on a reference TPM (swtpm) before they judge our nodes: a
// battery that fails here is wrong itself, not the node under test.

import t from 'tap';
import { randomBytes } from 'node:crypto';
import { runTpm2Battery } from './tpm2-battery.ts';
import { runTpm12Battery } from './tpm12-battery.ts';
import { startSwtpm } from './swtpm.ts';
import { sha256, tpm2Tools } from './tpm2-tools.ts';

t.test('tpm2-tools battery against swtpm --tpm2 (TCP TCTI)', async (t) => {
  const tpm = await startSwtpm(t, '2.0');
  await t.test('first run', (t) => runTpm2Battery(t, tpm.tcti));
  // the battery cleans up after itself: a second run on the same TPM passes too
  await t.test('second run on the same TPM', (t) => runTpm2Battery(t, tpm.tcti));
});

// tcsd cannot open a TCP TPM as /dev/tpm0 and this machine has no CUSE, so here tcsd
// reaches swtpm through its own TCP device switch; the namespace path that our nodes
// use is exercised by tpm12-node.test.ts.
t.test('tpm-tools battery through tcsd against swtpm (TPM 1.2, tcsd TCP device)', async (t) => {
  const tpm = await startSwtpm(t, '1.2');
  await runTpm12Battery(t, { tcp: { host: tpm.host, port: tpm.port } });
});

// The small pieces other tests reuse for "state survives stop/start", on a reference TPM.
t.test('persistKey/readPersistent, nvWrite/nvRead survive a swtpm restart; pcrExtend/pcrRead', async (t) => {
  const first = await startSwtpm(t, '2.0');
  const c1 = tpm2Tools(t, first.tcti);
  const before = await c1.pcrRead(16);
  const digest = sha256(Buffer.from('x'));
  await c1.pcrExtend(16, digest);
  t.equal((await c1.pcrRead(16)).toString('hex'), sha256(before, digest).toString('hex'), 'pcrExtend then pcrRead');
  const name = await c1.persistKey(0x81000020);
  const data = randomBytes(24);
  await c1.nvWrite(0x01500020, data);
  await first.stop();
  const second = await startSwtpm(t, '2.0', { stateDir: first.stateDir });
  const c2 = tpm2Tools(t, second.tcti);
  t.equal((await c2.readPersistent(0x81000020))?.toString('hex'), name.toString('hex'), 'same persistent key after restart');
  t.equal((await c2.nvRead(0x01500020, data.length)).toString('hex'), data.toString('hex'), 'same NV content after restart');
  t.equal((await c2.pcrRead(16)).toString('hex'), '00'.repeat(32), 'PCR 16 back to zero after the restart (startup clear)');
  await c2.evict(0x81000020);
  await c2.nvUndefine(0x01500020);
  t.equal(await c2.readPersistent(0x81000020), null, 'evicted');
});
