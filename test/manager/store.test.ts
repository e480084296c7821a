// The per-instance blob files: real files in a scratch state dir, no mocks.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { randomBytes, randomUUID } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { inspect } from 'node:util';
import { InstanceStore, MAX_BLOB, MAX_BLOB_FILE, instanceDir } from '../../manager/store/blob-store.ts';
import { newKey } from '../../manager/store/crypto.ts';
import { fill, flipByte, mode, newestSlotFile, restore, slotFiles, snapshot, stateDir, throwsCode, tinyTmpfs, walk } from './store-fixtures.ts';

function open(d: string, uuid: string = randomUUID(), key = newKey(), minVersions: Record<string, number> = {}) {
  return new InstanceStore({ stateDir: d, uuid, key, minVersions });
}

/** A store with `name` written once, and a copy of its slot files then kept aside. */
function withOldCopy(t: Test, name: string) {
  const d = stateDir(t);
  const uuid = randomUUID();
  const key = newKey();
  const s = open(d, uuid, key);
  s.store(name, Buffer.from('v1'));
  return { d, uuid, key, s, old: snapshot(s.dir, name) };
}

t.test('round trip, versions, missing blob', async (t) => {
  const d = stateDir(t);
  const s = open(d);
  t.equal(s.load('permall'), undefined, 'no blob yet');
  const a = randomBytes(1300);
  const b = randomBytes(9000);
  s.store('permall', a);
  s.store('volatilestate', b);
  s.store('savestate', new Uint8Array(0));
  t.same(s.load('permall'), a);
  t.same(s.load('volatilestate'), b);
  t.same(s.load('savestate'), new Uint8Array(0), 'an empty blob is a blob');
  s.store('permall', b);
  t.same(s.load('permall'), b, 'second version');
  t.same(s.versions(), { permall: 2, volatilestate: 1, savestate: 1 });
  const big = randomBytes(MAX_BLOB);
  s.store('big', big);
  t.same(s.load('big'), big, '1 MiB blob');
  const sub = Buffer.from(a).subarray(100, 200);
  s.store('sub', sub);
  t.same(s.load('sub'), sub, 'a view into a larger buffer stores only its bytes');
});

t.test('files 0600, directories 0700, whatever the umask', async (t) => {
  const d = stateDir(t);
  const old = process.umask(0);
  t.teardown(() => process.umask(old));
  const s = open(d);
  s.store('permall', randomBytes(100));
  s.store('volatilestate', randomBytes(100));
  s.delete('volatilestate');
  process.umask(old);
  const paths = [d, ...walk(d)];
  t.ok(paths.length >= 5);
  for (const p of paths) t.equal(mode(p), fs.statSync(p).isDirectory() ? 0o700 : 0o600, p);
});

t.test('no plaintext, no key in any file', async (t) => {
  const d = stateDir(t);
  const key = newKey();
  const s = open(d, randomUUID(), key);
  const marker = Buffer.from('MARKER-the-secret-EK-seed-0123456789');
  s.store('permall', Buffer.concat([randomBytes(500), marker, randomBytes(500)]));
  s.store('volatilestate', Buffer.concat([marker, marker]));
  t.ok(Buffer.from(s.load('permall')!).includes(marker), 'the marker is in the blob');
  for (const p of walk(d)) {
    if (!fs.statSync(p).isFile()) continue;
    const bytes = fs.readFileSync(p);
    t.equal(bytes.indexOf(marker), -1, `${p}: no plaintext`);
    t.equal(bytes.indexOf(key), -1, `${p}: no key`);
    t.equal(bytes.indexOf(marker.subarray(0, 12)), -1, `${p}: not even part of it`);
  }
  const shown = inspect(s, { depth: 5, showHidden: true }) + JSON.stringify(s);
  t.notOk(shown.includes(key.toString('hex')) || /\b(?:Buffer|Uint8Array)\(32\)/.test(shown), 'the key does not show when the store is logged');
});

/** Flip each byte of `f` in turn, load, put it back; the codes seen (or 'ok'). */
function flipEach(s: InstanceStore, f: string, expect: (got: Uint8Array | undefined) => boolean): Map<string, number> {
  const good = fs.readFileSync(f);
  const seen = new Map<string, number>();
  for (let i = 0; i < good.length; i++) {
    flipByte(f, i);
    let code = 'ok';
    try {
      if (!expect(s.load('permall'))) code = 'wrong content';
    } catch (e) {
      code = (e as { code?: string }).code ?? String(e);
    }
    seen.set(code, (seen.get(code) ?? 0) + 1);
    fs.writeFileSync(f, good);
  }
  return seen;
}

t.test('every flipped byte of the newest slot is EINTEGRITY, never a crash or a success', async (t) => {
  const d = stateDir(t);
  const s = open(d);
  const v1 = randomBytes(300);
  s.store('permall', v1);
  const [f0, f1] = slotFiles(s.dir, 'permall');
  const size = fs.statSync(f0).size;
  t.same([...flipEach(s, f0, () => false)], [['EINTEGRITY', size]], `written once: all ${size} single-byte flips (record and padding) refused`);
  t.same(s.load('permall'), v1, 'the restored slot loads again');

  const v2 = randomBytes(300);
  s.store('permall', v2);
  t.same([...flipEach(s, f1, () => false)], [['EINTEGRITY', size]], 'written twice: every flip of the newest slot refused (the other is older than the version this store wrote)');
  const stale = flipEach(s, f0, (got) => Buffer.from(got ?? []).equals(v2));
  t.same([...stale], [['ok', size]], 'a flip in the older slot does not hide the newest');
});

t.test('a blob moved to another instance or another name does not open', async (t) => {
  const d = stateDir(t);
  const key = newKey();
  const s1 = open(d, randomUUID(), key);
  const s2 = open(d, randomUUID(), key); // even under the same key
  s1.store('permall', randomBytes(100));
  s2.store('permall', randomBytes(100));
  fs.copyFileSync(join(s1.dir, 'permall'), join(s2.dir, 'permall'));
  throwsCode(t, () => s2.load('permall'), 'EINTEGRITY', 'copied to another instance');
  fs.copyFileSync(join(s1.dir, 'permall'), join(s1.dir, 'volatilestate'));
  throwsCode(t, () => s1.load('volatilestate'), 'EINTEGRITY', 'renamed to another blob name');
  t.ok(s1.load('permall'), 'the original still loads');
});

t.test('an older version put back is refused (EROLLBACK), in this store and after a restart', async (t) => {
  const { d, uuid, key, s, old } = withOldCopy(t, 'permall');
  s.store('permall', Buffer.from('v2'));
  const atV2 = snapshot(s.dir, 'permall');
  s.store('permall', Buffer.from('v3'));
  const [f0, f1] = slotFiles(s.dir, 'permall');
  const v3 = fs.readFileSync(f0);
  fs.copyFileSync(f1, f0); // the newest slot replaced by the older one
  throwsCode(t, () => s.load('permall'), 'EROLLBACK', 'newest slot replaced by a copy of the other');
  fs.writeFileSync(f0, v3);
  restore(atV2);
  throwsCode(t, () => s.load('permall'), 'EROLLBACK', 'both slots as they were at v2');
  restore(old);
  const e = throwsCode(t, () => s.load('permall'), 'EROLLBACK', 'both slots as they were at v1 (slot 1 absent)');
  t.match(e?.message, /version 1, older than the recorded version 3/);
  const recorded = s.versions();
  t.same(recorded, { permall: 3 }, 'what the table records');
  // Restart: a new store from the versions the table recorded.
  throwsCode(t, () => open(d, uuid, key, recorded).load('permall'), 'EROLLBACK', 'restarted store refuses v1');
  t.same(open(d, uuid, key, {}).load('permall'), Buffer.from('v1'), 'without the record it cannot know (the documented window)');
});

t.test('a deleted blob: tombstone, old copy refused, missing file refused', async (t) => {
  const { d, uuid, key, s, old } = withOldCopy(t, 'savestate');
  s.delete('savestate');
  t.equal(s.load('savestate'), undefined, 'deleted reads as none');
  t.same(s.versions(), { savestate: 2 }, 'the tombstone has a version');
  s.delete('never-was');
  t.same(fs.readdirSync(s.dir).sort(), ['savestate', 'savestate@1'], 'deleting what never existed writes nothing');
  const [f0, f1] = slotFiles(s.dir, 'savestate');
  fs.writeFileSync(f0, old.get(f0)!);
  t.equal(s.load('savestate'), undefined, "the blob's old slot put back beside the tombstone: still deleted");
  t.equal(open(d, uuid, key, {}).load('savestate'), undefined, 'still deleted in a store without a record');
  fs.copyFileSync(f0, f1);
  throwsCode(t, () => s.load('savestate'), 'EROLLBACK', 'old copy over the tombstone, same store');
  throwsCode(t, () => open(d, uuid, key, { savestate: 2 }).load('savestate'), 'EROLLBACK', 'old copy, restarted store');
  fs.rmSync(f0);
  fs.rmSync(f1);
  const e = throwsCode(t, () => open(d, uuid, key, { savestate: 2 }).load('savestate'), 'EROLLBACK', 'file gone where a version was recorded');
  t.match(e?.message, /missing, but version 2 was recorded/);
  s.store('savestate', Buffer.from('new'));
  t.same(open(d, uuid, key, s.versions()).load('savestate'), Buffer.from('new'), 'stores again after a delete');
});

t.test('a store built from a stale record still writes above the version on disk', async (t) => {
  // After a crash the table can lag the files: the next version must not reuse a number.
  const d = stateDir(t);
  const uuid = randomUUID();
  const key = newKey();
  const s = open(d, uuid, key);
  for (let i = 1; i <= 5; i++) s.store('permall', Buffer.from(`v${i}`));
  const v5 = snapshot(s.dir, 'permall');
  const s2 = open(d, uuid, key, { permall: 2 }); // the table last recorded version 2
  s2.store('permall', Buffer.from('v6'));
  t.same(s2.versions(), { permall: 6 });
  t.same(fs.readFileSync(newestSlotFile(s.dir, 'permall')!), fs.readFileSync(slotFiles(s.dir, 'permall')[1]), 'v6 went to the slot that did not hold v5');
  restore(v5);
  throwsCode(t, () => s2.load('permall'), 'EROLLBACK', 'the v5 copy is older than what s2 wrote');
});

t.test('wrong key, bad names, bad arguments', async (t) => {
  const d = stateDir(t);
  const uuid = randomUUID();
  const s = open(d, uuid);
  s.store('permall', randomBytes(50));
  const e = throwsCode(t, () => open(d, uuid, newKey()).load('permall'), 'EINTEGRITY', 'another key');
  t.ok(e?.cause, 'the cipher error is kept as the cause');
  for (const name of ['', '../table', 'a/b', '.hidden', 'permall.tmp-123', 'permall@1', 'x'.repeat(65), 'sp ace']) {
    throwsCode(t, () => s.store(name, randomBytes(1)), 'EINVAL', `name ${JSON.stringify(name)}`);
    throwsCode(t, () => s.load(name), 'EINVAL', `load ${JSON.stringify(name)}`);
  }
  throwsCode(t, () => open(d, 'NOT-A-UUID'), 'EINVAL', 'bad uuid');
  throwsCode(t, () => open(d, '../../etc'), 'EINVAL', 'path in uuid');
  throwsCode(t, () => open(d, randomUUID(), randomBytes(16)), 'EINVAL', 'short key');
  const keyErr = throwsCode(t, () => open(d, randomUUID(), randomBytes(31)), 'EINVAL', 'key of 31');
  t.notMatch(keyErr?.message, /[0-9a-f]{16}/, 'no key bytes in the message');
  throwsCode(t, () => open(d, randomUUID(), newKey(), { permall: -1 }), 'EINVAL', 'negative recorded version');
  throwsCode(t, () => s.store('permall', Buffer.alloc(MAX_BLOB + 1)), 'EOVERSIZE', 'blob over 1 MiB');
});

t.test('oversized, garbage, truncated and odd files are errors, never a crash', async (t) => {
  const d = stateDir(t);
  const s = open(d);
  const f = join(s.dir, 'permall');
  s.store('permall', randomBytes(2000));
  const good = fs.readFileSync(f);

  fs.writeFileSync(f, Buffer.alloc(MAX_BLOB_FILE + 1));
  const e = throwsCode(t, () => s.load('permall'), 'EINTEGRITY', 'oversized file');
  t.match(e?.message, /more than/);
  const recordEnd = 8 + good.readUInt32BE(4); // the slot header, then the record, then zeros
  for (let len = 0; len < recordEnd; len += len < 200 ? 1 : 97) {
    fs.writeFileSync(f, good.subarray(0, len));
    try {
      s.load('permall');
      t.fail(`truncated to ${len} accepted`);
    } catch (x) {
      if ((x as { code?: string }).code !== 'EINTEGRITY') t.fail(`truncated to ${len}: ${(x as Error).message}`);
    }
  }
  t.pass('every truncation into the record refused with EINTEGRITY');
  fs.writeFileSync(f, good.subarray(0, recordEnd));
  t.ok(s.load('permall'), 'cutting only the padding keeps the record');
  for (let i = 0; i < 300; i++) {
    const junk = randomBytes(1 + (i % 64) * 7);
    if (i % 3 === 0) junk[0] = 0xa7; // starts like a 7-entry map
    fs.writeFileSync(f, junk);
    try {
      s.load('permall');
      t.fail(`garbage ${i} accepted`);
    } catch (x) {
      if ((x as { code?: string }).code !== 'EINTEGRITY') t.fail(`garbage ${i}: ${(x as Error).message}`);
    }
  }
  t.pass('300 garbage files refused with EINTEGRITY');
  fs.writeFileSync(f, Buffer.concat([good, Buffer.from([1])]));
  throwsCode(t, () => s.load('permall'), 'EINTEGRITY', 'a trailing non-zero byte');
  fs.writeFileSync(f, Buffer.concat([good, Buffer.from([0])]));
  t.ok(s.load('permall'), 'a trailing zero is slot padding');

  fs.rmSync(f);
  fs.symlinkSync('/etc/passwd', f);
  throwsCode(t, () => s.load('permall'), 'EINTEGRITY', 'symbolic link');
  fs.rmSync(f);
  execFileSync('mkfifo', [f]);
  throwsCode(t, () => s.load('permall'), 'EINTEGRITY', 'a FIFO (and open did not hang)');
  fs.rmSync(f);
  fs.mkdirSync(f);
  throwsCode(t, () => s.load('permall'), 'EINTEGRITY', 'a directory');
  fs.rmdirSync(f);
  s.store('permall', Buffer.from('fine'));
  t.same(s.load('permall'), Buffer.from('fine'), 'a store over the damage works');
});

t.test('destroy removes the instance directory', async (t) => {
  const d = stateDir(t);
  const s = open(d);
  s.store('permall', randomBytes(10));
  s.destroy();
  t.notOk(fs.existsSync(instanceDir(d, s.uuid)));
});

/** A store on a 64 KiB tmpfs holding one 9000-byte blob, then the tmpfs filled up. */
function onFullDisk(t: Test) {
  const mnt = tinyTmpfs(t, '64k');
  const key = newKey();
  const s = open(join(mnt, 'D'), randomUUID(), key);
  const before = randomBytes(9000);
  s.store('volatilestate', before);
  return { mnt, s, key, before, filled: fill(mnt) };
}

t.test('a full disk: ESTATE with ENOSPC as the cause, the old blob kept, works again after', async (t) => {
  const { mnt, s, key, before, filled } = onFullDisk(t);
  t.ok(filled > 0, `filled ${filled} bytes`);
  const e = throwsCode(t, () => s.store('volatilestate', randomBytes(9000)), 'ESTATE', 'store on a full disk');
  t.equal((e?.cause as NodeJS.ErrnoException | undefined)?.code, 'ENOSPC', 'cause is ENOSPC');
  t.match(e?.message, /full/);
  t.same(s.load('volatilestate'), before, 'the previous blob still loads');
  t.same(fs.readdirSync(s.dir).sort(), ['volatilestate'], 'nothing left behind (slot 1 was created, could not be filled, and was removed)');
  t.same(open(join(mnt, 'D'), s.uuid, key, s.versions()).load('volatilestate'), before, 'a restarted store opens the previous blob too');
  fs.rmSync(join(mnt, 'fill'));
  const after = randomBytes(9000);
  s.store('volatilestate', after);
  t.same(s.load('volatilestate'), after, 'stores again once space is freed');

  // Both slots now hold blocks: a full disk no longer stops a save of the same size, only one
  // that needs more room than its slot has.
  fill(mnt);
  const inPlace = randomBytes(9000);
  s.store('volatilestate', inPlace);
  s.store('volatilestate', randomBytes(9100));
  s.store('volatilestate', inPlace);
  t.same(s.load('volatilestate'), inPlace, 'on the full disk, saves that fit their slot are made in place');
  const e2 = throwsCode(t, () => s.store('volatilestate', randomBytes(40000)), 'ESTATE', 'a blob outgrowing its slot on the full disk');
  t.equal((e2?.cause as NodeJS.ErrnoException | undefined)?.code, 'ENOSPC', 'cause is ENOSPC');
  t.same(s.load('volatilestate'), inPlace, 'the previous blob still loads');
  t.same(open(join(mnt, 'D'), s.uuid, key, s.versions()).load('volatilestate'), inPlace, 'also in a restarted store');
});

// On a nearly full disk a write comes back short: the store must fail, not rename a cut-off
// file over the old blob.
t.test('a nearly full disk (a short write) keeps the old blob', async (t) => {
  const { mnt, s, before, filled } = onFullDisk(t);
  fs.truncateSync(join(mnt, 'fill'), filled - 4096); // one page free: the write is cut short
  let code: string | undefined;
  try {
    s.store('volatilestate', randomBytes(9000));
  } catch (e) {
    code = (e as { code?: string }).code;
  }
  t.equal(code, 'ESTATE', 'the short write is an ESTATE failure');
  let kept = false;
  try {
    kept = Buffer.from(s.load('volatilestate') ?? []).equals(before);
  } catch {
    kept = false;
  }
  t.ok(kept, 'the previous blob still loads');
});
