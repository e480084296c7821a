// The instance table and its epoch protocol: real files, a counter kept in memory standing in
// for the hardware NV counter (the table only sees the MonotonicCounter seam).
import t from 'tap';
import * as fs from 'node:fs';
import { randomBytes, randomUUID } from 'node:crypto';
import { InstanceStore } from '../../manager/store/blob-store.ts';
import { newKey } from '../../manager/store/crypto.ts';
import {
  commitTable, openTable, saveTable, startEpoch, tableFile, type InstanceRecord, type MonotonicCounter, type Table,
} from '../../manager/store/table.ts';
import { flipByte, mode, restore, snapshot, stateDir, throwsCode } from './store-fixtures.ts';

class Counter implements MonotonicCounter {
  failNextIncrement = false;
  constructor(public value = 0) {}
  async read(): Promise<bigint> {
    return BigInt(this.value);
  }
  async increment(): Promise<bigint> {
    if (this.failNextIncrement) {
      this.failNextIncrement = false;
      throw new Error('host crashed before the counter increment');
    }
    return BigInt(++this.value);
  }
}

function record(over: Partial<InstanceRecord> = {}): InstanceRecord {
  return {
    uuid: randomUUID(), name: 'guest-1', tpm: '2.0', key: newKey(), created: Date.now(),
    blobs: { permall: 3, volatilestate: 7 }, meta: { domid: 5, guest: 'web', ekCert: randomBytes(900), migrating: false, note: null },
    ...over,
  };
}

t.test('missing table: new when the counter is 0 or fresh, else ENOENT; fresh never overwrites', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const o = openTable(d, root, 0);
  t.same(o, { table: { epoch: 0, instances: [] }, bumpPending: false, created: true });
  const e = throwsCode(t, () => openTable(d, root, 9), 'ENOENT', 'no table, counter 9');
  t.match(e?.message, /counter is at 9/);
  t.equal(openTable(d, root, 9n, { fresh: true }).table.epoch, 9, 'fresh: a new table at the counter');
  saveTable(d, root, o.table, 1);
  throwsCode(t, () => openTable(d, root, 1, { fresh: true }), 'EBUSY', 'fresh with a table present');
});

t.test('round trip: instances, keys, blobs and meta survive; file 0600 and no plaintext', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const table: Table = { epoch: 0, instances: [record(), record({ name: 'guest 2 (tpm 1.2)', tpm: '1.2', blobs: {}, meta: {} })] };
  saveTable(d, root, table, 1);
  t.equal(table.epoch, 1, 'epoch advanced once written');
  const o = openTable(d, root, 1);
  t.equal(o.bumpPending, false);
  t.equal(o.created, false);
  t.same(o.table, table, 'same content back');
  t.ok(Buffer.from(o.table.instances[0]!.key).equals(Buffer.from(table.instances[0]!.key)), 'key bytes equal');
  t.equal(mode(tableFile(d)), 0o600);
  t.equal(mode(d), 0o700);
  const bytes = fs.readFileSync(tableFile(d));
  for (const r of table.instances) {
    t.equal(bytes.indexOf(Buffer.from(r.key)), -1, 'no instance key in the file');
    t.equal(bytes.indexOf(Buffer.from(r.uuid)), -1, 'no uuid in the file');
  }
  t.equal(bytes.indexOf(Buffer.from('guest-1')), -1, 'no name in the file');
  t.equal(bytes.indexOf(root), -1, 'no root key in the file');
  throwsCode(t, () => saveTable(d, root, table, 1), 'EINVAL', 'an epoch not above the current one');
});

t.test('table epoch against the counter: equal, bump pending, old copy, too new', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const table: Table = { epoch: 0, instances: [record()] };
  saveTable(d, root, table, 5);
  const epoch5 = fs.readFileSync(tableFile(d));
  t.equal(openTable(d, root, 5).bumpPending, false, 'epoch = counter');
  t.equal(openTable(d, root, 4).bumpPending, true, 'epoch = counter + 1: bump pending');
  throwsCode(t, () => openTable(d, root, 3), 'EROLLBACK', 'epoch two above the counter');
  saveTable(d, root, table, 6);
  saveTable(d, root, table, 7);
  fs.writeFileSync(tableFile(d), epoch5);
  const e = throwsCode(t, () => openTable(d, root, 7), 'EROLLBACK', 'old table copied back after two epochs');
  t.match(e?.message, /epoch 5 but the hardware counter is at 7: an old copy of the state dir was put back/);
});

t.test('tampering: every flipped byte, a wrong root key, garbage, truncation, oversize', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  saveTable(d, root, { epoch: 0, instances: [record()] }, 3);
  const f = tableFile(d);
  const good = fs.readFileSync(f);
  let refused = 0;
  for (let i = 0; i < good.length; i++) {
    flipByte(f, i);
    try {
      openTable(d, root, 3);
      t.fail(`byte ${i} flipped accepted`);
    } catch (e) {
      if ((e as { code?: string }).code === 'EINTEGRITY') refused++;
      else t.fail(`byte ${i}: ${(e as Error).message}`);
    }
    fs.writeFileSync(f, good);
  }
  t.equal(refused, good.length, `all ${good.length} flips refused with EINTEGRITY`);
  const e = throwsCode(t, () => openTable(d, newKey(), 3), 'EINTEGRITY', 'wrong root key');
  t.notOk(e?.message.includes(root.toString('hex')), 'no key in the message');
  for (let len = 0; len < good.length; len += 13) {
    fs.writeFileSync(f, good.subarray(0, len));
    throwsCode(t, () => openTable(d, root, 3), 'EINTEGRITY', `truncated to ${len}`);
  }
  fs.writeFileSync(f, randomBytes(777));
  throwsCode(t, () => openTable(d, root, 3), 'EINTEGRITY', 'garbage');
  fs.writeFileSync(f, '');
  fs.truncateSync(f, (64 << 20) + 1);
  throwsCode(t, () => openTable(d, root, 3), 'EINTEGRITY', 'oversized (sparse) file');
  throwsCode(t, () => openTable(d, randomBytes(16), 3), 'EINVAL', 'short root key');
});

t.test('saveTable validates every record', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const bad: Array<[string, Partial<InstanceRecord>]> = [
    ['uuid', { uuid: 'nope' }],
    ['name', { name: 'a\nb' }],
    ['empty name', { name: '' }],
    ['tpm', { tpm: '3.0' as never }],
    ['key', { key: randomBytes(31) }],
    ['created', { created: -1 }],
    ['blobs', { blobs: { '../x': 1 } }],
    ['blob version', { blobs: { permall: 1.5 } }],
    ['meta key', { meta: { 'bad key': 1 } }],
    ['meta value', { meta: { nested: { a: 1 } as never } }],
    ['meta text', { meta: { long: 'x'.repeat(5000) } }],
  ];
  for (const [what, over] of bad) {
    const r = record(over);
    throwsCode(t, () => saveTable(d, root, { epoch: 0, instances: [r] }, 1), 'EINVAL', what);
  }
  const r = record();
  throwsCode(t, () => saveTable(d, root, { epoch: 0, instances: [r, { ...r }] }, 1), 'EINVAL', 'duplicate uuid');
  t.notOk(fs.existsSync(tableFile(d)), 'nothing written');
});

t.test('the epoch protocol: start, commits, a crash before the increment, a stale dir', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const counter = new Counter(41); // a hardware counter does not start at 0
  throwsCode(t, () => openTable(d, root, 41), 'ENOENT', 'a new host needs fresh');
  const first = await startEpoch(d, root, counter, { fresh: true });
  t.equal(counter.value, 42);
  t.equal(first.table.epoch, 42, 'the table is at the counter');
  const backup = fs.readFileSync(tableFile(d));

  first.table.instances.push(record());
  await commitTable(d, root, first.table, counter);
  t.equal(counter.value, 43);
  t.equal(first.table.epoch, 43);

  // Crash between the table write and the counter increment.
  first.table.instances.push(record());
  counter.failNextIncrement = true;
  await t.rejects(commitTable(d, root, first.table, counter), /crashed/);
  t.equal(counter.value, 43, 'counter not bumped');
  const o = openTable(d, root, 43);
  t.equal(o.bumpPending, true, 'next start sees the pending bump');
  t.equal(o.table.instances.length, 2, 'with the table as written');

  const again = await startEpoch(d, root, counter);
  t.equal(again.bumpPending, true, 'startEpoch reports it');
  t.equal(counter.value, 45, 'finished the bump, then wrote and counted a new epoch');
  t.equal(again.table.epoch, 45);
  t.equal(openTable(d, root, 45).bumpPending, false);

  fs.writeFileSync(tableFile(d), backup);
  await t.rejects(startEpoch(d, root, counter), { code: 'EROLLBACK' }, 'the state dir copied at start is refused');

  const stray = new Counter(45);
  fs.rmSync(tableFile(d));
  const s = await startEpoch(d, root, stray, { fresh: true });
  stray.value += 1; // something else increments the counter
  await t.rejects(commitTable(d, root, s.table, stray), { code: 'ESTATE' }, 'a counter that moved under the manager');
});

t.test('blob versions through the table: an old blob refused after a restart', async (t) => {
  const d = stateDir(t, 'table');
  const root = newKey();
  const counter = new Counter(0);
  const { table } = await startEpoch(d, root, counter);
  const r = record({ blobs: {}, meta: {} });
  table.instances.push(r);
  const s = new InstanceStore({ stateDir: d, uuid: r.uuid, key: r.key, minVersions: r.blobs });
  s.store('permall', Buffer.from('one'));
  const old = snapshot(s.dir, 'permall');
  s.store('permall', Buffer.from('two'));
  r.blobs = s.versions();
  await commitTable(d, root, table, counter); // clean stop

  restore(old);
  const restarted = await startEpoch(d, root, counter);
  const rec = restarted.table.instances.find((x) => x.uuid === r.uuid)!;
  t.same(rec.blobs, { permall: 2 });
  const s2 = new InstanceStore({ stateDir: d, uuid: rec.uuid, key: rec.key, minVersions: rec.blobs });
  const e = throwsCode(t, () => s2.load('permall'), 'EROLLBACK', 'old permall after restart');
  t.match(e?.message, /older than the recorded version 2/);
});
