// The blob store's A/B slot files on real files: a crash mid-write (a torn newest slot
// written here directly) opens the previous version, saves rewrite in place, a blob that
// outgrows its slot grows it, and a state dir of the one-file layout still opens.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import { InstanceStore } from '../../manager/store/blob-store.ts';
import { newKey } from '../../manager/store/crypto.ts';
import { mode, newestSlotFile, slotEnvelope, slotFiles, stateDir, throwsCode } from './store-fixtures.ts';

function open(d: string, uuid: string, key: Buffer, minVersions: Record<string, number> = {}) {
  return new InstanceStore({ stateDir: d, uuid, key, minVersions });
}

function scratch(t: Test) {
  const d = stateDir(t, 'slots');
  const uuid = randomUUID();
  const key = newKey();
  return { d, uuid, key, s: open(d, uuid, key) };
}

t.test('a torn newest slot (a crash mid-write) opens the previous version; the next write goes over the torn slot', async (t) => {
  const { d, uuid, key, s } = scratch(t);
  const v1 = randomBytes(1300);
  s.store('permall', v1);
  t.same(open(d, uuid, key, s.versions()).load('permall'), v1, 'a blob written once (slot 1 absent) opens');
  const acknowledged = s.versions();
  const [f0, f1] = slotFiles(s.dir, 'permall');
  const good0 = fs.readFileSync(f0);
  const size = good0.length;
  const tears: [string, () => void][] = [
    ['a half-written slot 1 (new file, cut short)', () => fs.writeFileSync(f1, randomBytes(700))],
    ['an empty slot 1', () => fs.writeFileSync(f1, Buffer.alloc(0))],
    ['slot 1 all zeros (allocated, nothing landed)', () => fs.writeFileSync(f1, Buffer.alloc(size))],
  ];
  for (const [what, tear] of tears) {
    tear();
    t.same(open(d, uuid, key, acknowledged).load('permall'), v1, `${what}: the previous version opens after the "crash"`);
  }
  // A real torn write: the next version's slot, of which only the first sectors landed.
  const s2 = open(d, uuid, key, acknowledged);
  const v2 = randomBytes(1300);
  s2.store('permall', v2);
  const whole2 = fs.readFileSync(f1);
  t.same(fs.readFileSync(f0), good0, 'v2 went to slot 1, slot 0 untouched');
  for (const cut of [512, 1024, 1536]) {
    fs.writeFileSync(f1, Buffer.concat([whole2.subarray(0, cut), randomBytes(size - cut)]));
    t.same(open(d, uuid, key, acknowledged).load('permall'), v1, `v2 torn after ${cut} bytes: v1 opens`);
  }
  const s3 = open(d, uuid, key, acknowledged);
  t.same(s3.load('permall'), v1);
  const v3 = randomBytes(1300);
  s3.store('permall', v3);
  t.same(fs.readFileSync(f0), good0, 'the write after the crash rewrote the torn slot, not the good one');
  t.equal(slotEnvelope(f1, 1).version, 2, 'at the next version after the last that opens (the torn one never did)');
  t.same(open(d, uuid, key, s3.versions()).load('permall'), v3);

  // Torn where it was acknowledged is not a crash: the recorded version is refused, not replaced.
  fs.writeFileSync(f1, randomBytes(size));
  const e = throwsCode(t, () => open(d, uuid, key, s3.versions()).load('permall'), 'EINTEGRITY', 'the acknowledged newest slot damaged');
  t.match(e?.message, /older than the recorded version 2/, 'and the message says the other slot is older');
});

t.test('saves rewrite the two slot files in place: same inodes, same sizes, 0600', async (t) => {
  const { s } = scratch(t);
  const [f0, f1] = slotFiles(s.dir, 'volatilestate');
  s.store('volatilestate', randomBytes(9000));
  s.store('volatilestate', randomBytes(9000));
  const before = [fs.statSync(f0), fs.statSync(f1)];
  const dirBefore = fs.statSync(s.dir);
  for (let i = 0; i < 20; i++) s.store('volatilestate', randomBytes(8900 + i * 10));
  const after = [fs.statSync(f0), fs.statSync(f1)];
  t.same(after.map((x) => [x.ino, x.size]), before.map((x) => [x.ino, x.size]), `inodes and sizes unchanged (${before.map((x) => x.size).join(', ')} B)`);
  t.equal(fs.statSync(s.dir).mtimeMs, dirBefore.mtimeMs, 'the directory did not change (no rename, no new file)');
  t.same(fs.readdirSync(s.dir).sort(), ['volatilestate', 'volatilestate@1']);
  for (const f of [f0, f1]) t.equal(mode(f), 0o600, f);
  t.equal(slotEnvelope(newestSlotFile(s.dir, 'volatilestate')!, 1).version, 22);
});

t.test('a blob that outgrows its slot grows it; one that shrinks far gives the room back', async (t) => {
  const { d, uuid, key, s } = scratch(t);
  const [f0, f1] = slotFiles(s.dir, 'permall');
  s.store('permall', randomBytes(1300));
  s.store('permall', randomBytes(1300));
  const small = fs.statSync(f0).size;
  const big = randomBytes(30000);
  s.store('permall', big);
  t.ok(fs.statSync(f0).size > 30000, `slot 0 grew from ${small} to ${fs.statSync(f0).size}`);
  t.equal(fs.statSync(f1).size, small, 'slot 1 (the previous version) untouched');
  t.same(open(d, uuid, key, s.versions()).load('permall'), big);
  const huge = randomBytes(400_000);
  s.store('permall', huge);
  s.store('permall', huge);
  const tiny = randomBytes(1000);
  s.store('permall', tiny);
  s.store('permall', tiny);
  t.ok(fs.statSync(f0).size <= 8192 && fs.statSync(f1).size <= 8192, `both slots shrank back (${fs.statSync(f0).size}, ${fs.statSync(f1).size} B)`);
  t.same(open(d, uuid, key, s.versions()).load('permall'), tiny);
});

t.test('a state dir of the one-file layout opens, and moves to slots as it is written', async (t) => {
  const { d, uuid, key, s } = scratch(t);
  const v1 = randomBytes(1300);
  s.store('permall', v1);
  s.store('savestate', randomBytes(100));
  s.delete('savestate');
  // The one-file layout's files held exactly the record a slot holds, without the slot
  // header and padding: write them back that way, as an old manager left them.
  for (const name of ['permall', 'savestate']) {
    const newest = newestSlotFile(s.dir, name)!;
    const bytes = fs.readFileSync(newest);
    for (const f of slotFiles(s.dir, name)) fs.rmSync(f, { force: true });
    fs.writeFileSync(join(s.dir, name), bytes.subarray(8, 8 + bytes.readUInt32BE(4)), { mode: 0o600 });
  }
  const recorded = s.versions();
  const legacy = fs.readFileSync(join(s.dir, 'permall'));
  const old = open(d, uuid, key, recorded);
  t.same(old.load('permall'), v1, 'an old-layout blob opens');
  t.equal(old.load('savestate'), undefined, 'an old-layout tombstone is still a delete');
  const v2 = randomBytes(1400);
  old.store('permall', v2);
  t.same(fs.readFileSync(join(s.dir, 'permall')), legacy, 'the first write leaves the old file (slot 0, the newest) alone');
  t.same(open(d, uuid, key, old.versions()).load('permall'), v2, 'and the new version opens from slot 1');
  const v3 = randomBytes(1300);
  old.store('permall', v3);
  t.equal(slotEnvelope(join(s.dir, 'permall'), 0).version, recorded.permall! + 2, 'the second write turned the old file into slot 0');
  t.same(open(d, uuid, key, old.versions()).load('permall'), v3);
  fs.rmSync(slotFiles(s.dir, 'permall')[1]);
  fs.writeFileSync(join(s.dir, 'permall'), legacy);
  throwsCode(t, () => open(d, uuid, key, old.versions()).load('permall'), 'EROLLBACK', 'the old-layout file put back alone is refused as an old copy');
});
