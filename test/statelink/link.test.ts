// The vtpmd ↔ manager state link over a real tpmif link between two domains: this process
// is vtpmd's side (LinkStateStore over a TpmifFront), a link-server.ts daemon the manager's
// (stateLinkHandler in a serveSync worker over a real store).
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { encode } from 'cbor-x';
import { isVtpmError } from '../../drivers/base/errors.ts';
import { DirStateStore } from '../../drivers/host/state-dir.ts';
import { CHUNK, encodeRequest, MAX_BLOB } from '../../drivers/statelink/protocol.ts';
import { LinkStateStore } from '../../drivers/statelink/client.ts';
import { codeChain, linkFixture, thrown, type Link } from './links.ts';

const fx = await linkFixture();
t.teardown(() => fx.done());

const same = (a: Uint8Array | undefined, b: Uint8Array): boolean => a !== undefined && Buffer.from(a).equals(Buffer.from(b));

/** A good request still works on the link. */
function stillWorks(t: Test, link: Link, what: string): void {
  const blob = randomBytes(5000);
  link.store.store('after', blob);
  t.ok(same(link.store.load('after'), blob), `the link works after ${what}`);
}

t.test('round trips through the manager’s encrypted store', async (t) => {
  const link = await fx.open({ backend: 'instance' });
  t.teardown(() => link.close());
  for (const size of [0, 1, 3 * 1024, 9 * 1024, 100 * 1024, MAX_BLOB]) {
    const blob = randomBytes(size);
    link.store.store(`blob-${size}`, blob);
    t.ok(same(link.store.load(`blob-${size}`), blob), `${size} bytes stored and loaded intact`);
  }
  const v2 = randomBytes(9 * 1024);
  link.store.store('blob-9216', v2);
  t.ok(same(link.store.load('blob-9216'), v2), 'an overwrite is what a later load returns');
  link.store.delete('blob-9216');
  t.equal(link.store.load('blob-9216'), undefined, 'a deleted blob loads as undefined');
  t.equal(link.store.load('never-stored'), undefined, 'a missing blob loads as undefined');
  t.doesNotThrow(() => link.store.delete('never-stored'), 'deleting a missing blob is fine');
  const big = thrown(() => link.store.store('too-big', new Uint8Array(MAX_BLOB + 1)));
  t.same(codeChain(big), ['ESTATE', 'EOVERSIZE'], 'a blob over 1 MiB is refused before it is sent');
  const badName = thrown(() => link.store.load('../escape'));
  t.same(codeChain(badName), ['ESTATE', 'EINVAL'], 'a name that is not a plain file name is refused');
  t.notOk(link.logLines().some((l) => /[0-9a-f]{64}/.test(l)), 'no log line holds blob bytes');
});

t.test('a request for another instance is refused (EPERM) and its uuid logged once', async (t) => {
  const link = await fx.open({ backend: 'instance' });
  t.teardown(() => link.close());
  link.store.store('permall', Buffer.from('mine'));
  const other = randomUUID();
  const thief = new LinkStateStore(link.front, other);
  for (let i = 0; i < 3; i++) {
    const e = thrown(() => thief.load('permall'));
    t.ok(isVtpmError(e, 'ESTATE'), 'the client throws ESTATE');
    t.equal(codeChain(e)[1], 'EPERM', 'caused by EPERM from the server');
  }
  t.same(codeChain(thrown(() => thief.store('permall', Buffer.from('theirs')))), ['ESTATE', 'EPERM'], 'store refused too');
  t.same(codeChain(thrown(() => thief.delete('permall'))), ['ESTATE', 'EPERM'], 'delete refused too');
  const named = link.logLines().filter((l) => l.includes(other));
  t.equal(named.length, 1, 'the offender is logged once');
  t.match(named[0], /refused a request for instance/);
  t.equal(Buffer.from(link.store.load('permall')!).toString(), 'mine', 'the blob is untouched and its owner still loads it');
});

t.test('malformed requests get error replies; the link keeps working', async (t) => {
  const link = await fx.open({ backend: 'instance' });
  t.teardown(() => link.close());
  const { uuid } = link;
  const good = encodeRequest({ op: 'store', uuid, name: 'x', total: 10, offset: 0, data: new Uint8Array(10) });
  const cases: [string, Uint8Array, string][] = [
    ['garbage bytes', new Uint8Array([0xff, 0x00, 0x13, 0x37, 0xfe]), 'EPROTO'],
    ['truncated CBOR', good.subarray(0, good.length - 3), 'EPROTO'],
    ['CBOR with trailing bytes', Buffer.concat([good, Buffer.from([0])]), 'EPROTO'],
    ['a CBOR array, not a map', encode([1, uuid, 'load']), 'EPROTO'],
    ['version 2', encode({ v: 2, uuid, op: 'load', name: 'x', offset: 0 }), 'EPROTO'],
    ['no version', encode({ uuid, op: 'load', name: 'x', offset: 0 }), 'EPROTO'],
    ['a reply-sized request (4096 bytes)', sized4096(uuid), 'EINVAL'],
    ['unknown op', encode({ v: 1, uuid, op: 'format', name: 'x' }), 'EINVAL'],
    ['offset as a string', encode({ v: 1, uuid, op: 'load', name: 'x', offset: '0' }), 'EINVAL'],
    ['name as a number', encode({ v: 1, uuid, op: 'delete', name: 7 }), 'EINVAL'],
    ['name with a slash', encode({ v: 1, uuid, op: 'delete', name: 'a/b' }), 'EINVAL'],
    ['data as a string', encode({ v: 1, uuid, op: 'store', name: 'x', total: 3, offset: 0, data: 'abc' }), 'EINVAL'],
    ['negative total', encode({ v: 1, uuid, op: 'store', name: 'x', total: -1, offset: 0, data: Buffer.alloc(0) }), 'EINVAL'],
    ['total over 1 MiB', encode({ v: 1, uuid, op: 'store', name: 'x', total: MAX_BLOB + 1, offset: 0, data: Buffer.alloc(1) }), 'EINVAL'],
    ['uuid missing', encode({ v: 1, op: 'load', name: 'x', offset: 0 }), 'EINVAL'],
    ['a chunk larger than its total', encode({ v: 1, uuid, op: 'store', name: 'x', total: 2, offset: 0, data: Buffer.alloc(3) }), 'EPROTO'],
  ];
  for (const [what, req, code] of cases) {
    const r = link.raw(req);
    t.equal(r.ok, false, `${what}: error reply`);
    t.equal(r.error?.code, code, `${what}: ${code}`);
  }
  stillWorks(t, link, 'malformed requests');
  t.ok(link.logLines().length > 0, 'refusals are logged');
  t.notOk(link.logLines().some((l) => l.includes(Buffer.from(good).toString('hex').slice(0, 16))), 'no log line holds request bytes');
});

/** A store request of exactly 4096 bytes (data far over a chunk). */
function sized4096(uuid: string): Uint8Array {
  let n = 4096 - 120;
  for (;;) {
    const b = encode({ v: 1, uuid, op: 'store', name: 'x', total: n, offset: 0, data: Buffer.alloc(n) });
    if (b.length === 4096) return b;
    n += 4096 - b.length;
  }
}

t.test('a store that breaks the chunk order is refused and its partial blob dropped', async (t) => {
  const link = await fx.open({ backend: 'instance' });
  t.teardown(() => link.close());
  const { uuid } = link;
  const total = 3 * CHUNK + 100;
  const blob = randomBytes(total);
  const chunk = (offset: number, o: { name?: string; total?: number; len?: number } = {}) =>
    link.raw(encodeRequest({ op: 'store', uuid, name: o.name ?? 'nv', total: o.total ?? total, offset, data: blob.subarray(offset, offset + (o.len ?? CHUNK)) }));
  const misuses: [string, () => Record<string, any>][] = [
    ['a chunk out of order', () => chunk(2 * CHUNK)],
    ['an overlapping chunk', () => chunk(CHUNK - 16)],
    ['a chunk past the total', () => chunk(CHUNK, { len: CHUNK, total: CHUNK + 10 })],
    ['the total changed midway', () => chunk(CHUNK, { total: total + 1 })],
    ['another name mid-store', () => chunk(CHUNK, { name: 'other' })],
  ];
  for (const [what, misuse] of misuses) {
    const first = chunk(0);
    t.same([first.ok, first.stored], [true, false], `${what}: the first chunk is taken, not yet stored`);
    const r = misuse();
    t.same([r.ok, r.error?.code], [false, 'EPROTO'], `${what}: EPROTO`);
    const next = chunk(CHUNK);
    t.same([next.ok, next.error?.code], [false, 'EPROTO'], `${what}: the partial blob was dropped (the proper next chunk is refused)`);
    t.equal(link.store.load('nv'), undefined, `${what}: nothing was committed`);
  }
  const first = chunk(0);
  link.raw(encodeRequest({ op: 'delete', uuid, name: 'unrelated' }));
  t.equal(chunk(CHUNK).error?.code, 'EPROTO', 'another request in between drops the partial blob too');
  t.equal(first.stored, false);
  for (let off = 0; off < total; off += CHUNK) t.equal(chunk(off).stored, off + CHUNK >= total, `chunk at ${off}: stored only on the last`);
  t.ok(same(link.store.load('nv'), blob), 'chunks in order commit the whole blob');
  stillWorks(t, link, 'refused chunks');
});

t.test('a load is served from one snapshot; the backend changing midway is not mixed in', async (t) => {
  const state = join(fx.dir, 'snapshot-state');
  const link = await fx.open({ backend: 'dir', state });
  t.teardown(() => link.close());
  const { uuid } = link;
  const v1 = Buffer.alloc(9 * 1024, 1);
  const v2 = Buffer.alloc(9 * 1024, 2);
  link.store.store('permall', v1);
  const load = (offset: number) => link.raw(encodeRequest({ op: 'load', uuid, name: 'permall', offset }));
  const parts = [load(0)];
  new DirStateStore(state).store('permall', v2); // a new version lands between chunks
  parts.push(load(CHUNK), load(2 * CHUNK));
  t.same(parts.map((p) => p.total), [v1.length, v1.length, v1.length], 'every chunk gives the same total');
  t.ok(Buffer.concat(parts.map((p) => p.data)).equals(v1), 'all chunks come from the version seen at offset 0');
  t.ok(same(link.store.load('permall'), v2), 'the next load sees the new version');
  load(0);
  link.raw(encodeRequest({ op: 'delete', uuid, name: 'other' }));
  t.same([load(CHUNK).ok, load(CHUNK).error?.code], [false, 'EPROTO'], 'another request drops the snapshot: a later chunk is refused');
  t.equal(load(5).error?.code, 'EPROTO', 'a load chunk at an unexpected offset is refused');
});

t.test('a full file system at the manager: the client gets ESTATE with ENOSPC in the causes', async (t) => {
  const mnt = mkdtempSync(join(fx.dir, 'full-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', mnt]);
  t.teardown(() => {
    execFileSync('umount', ['-l', mnt]);
    rmSync(mnt, { recursive: true, force: true });
  });
  const link = await fx.open({ backend: 'instance', state: mnt });
  t.teardown(() => link.close());
  const e = thrown(() => link.store.store('permall', randomBytes(100 * 1024)));
  t.ok(isVtpmError(e, 'ESTATE'), 'the store throws ESTATE');
  t.ok(codeChain(e).includes('ENOSPC'), `ENOSPC is kept in the cause chain (${codeChain(e).join(' ← ')})`);
  t.equal(link.store.load('permall'), undefined, 'nothing half-written is loaded');
  t.ok(link.logLines().some((l) => /store of permall .*failed/.test(l)), 'the manager logs the failed store');
  const small = randomBytes(100);
  link.store.store('small', small);
  t.ok(same(link.store.load('small'), small), 'a store that fits still works on the same link');
});

t.test('the manager stops serving or dies: the client fails within its timeout, never hangs', async (t) => {
  const timeoutMs = 800;
  const stopped = await fx.open({ backend: 'instance', timeoutMs });
  t.teardown(() => stopped.close());
  stopped.store.store('permall', randomBytes(10_000));
  process.kill(stopped.pid, 'SIGUSR2'); // the serve loop ends; nobody answers
  await new Promise((r) => setTimeout(r, 100));
  let t0 = performance.now();
  let e = thrown(() => stopped.store.store('permall', randomBytes(10_000)));
  let ms = performance.now() - t0;
  t.same(codeChain(e).slice(0, 2), ['ESTATE', 'ETIMEDOUT'], 'nobody serving: ESTATE caused by ETIMEDOUT');
  t.ok(ms < timeoutMs + 1000, `failed after ${Math.round(ms)} ms (timeout ${timeoutMs} ms)`);

  const killed = await fx.open({ backend: 'instance', timeoutMs });
  t.teardown(() => killed.close());
  killed.store.store('permall', randomBytes(10_000));
  process.kill(killed.pid, 'SIGKILL');
  await new Promise((r) => setTimeout(r, 300));
  t0 = performance.now();
  e = thrown(() => killed.store.store('permall', randomBytes(10_000)));
  ms = performance.now() - t0;
  t.ok(isVtpmError(e, 'ESTATE'), 'manager killed: ESTATE');
  t.ok(['ECLOSED', 'ETIMEDOUT'].includes(codeChain(e)[1]!), `caused by ${codeChain(e)[1]}`);
  t.ok(ms < timeoutMs + 1000, `failed after ${Math.round(ms)} ms`);
});

t.test('throughput: 1.3 KB store and load over the link, DirStateStore on tmpfs', async (t) => {
  const state = mkdtempSync('/dev/shm/vtpm-statelink-');
  t.teardown(() => rmSync(state, { recursive: true, force: true }));
  mkdirSync(state, { recursive: true });
  const link = await fx.open({ backend: 'dir', state });
  t.teardown(() => link.close());
  const blob = randomBytes(1300);
  const n = 500;
  const st: number[] = [];
  const ld: number[] = [];
  for (let i = 0; i < n; i++) {
    let t0 = performance.now();
    link.store.store('volatilestate', blob);
    st.push(performance.now() - t0);
    t0 = performance.now();
    const back = link.store.load('volatilestate');
    ld.push(performance.now() - t0);
    if (!same(back, blob)) t.fail('blob changed');
  }
  const median = (a: number[]) => Math.round([...a].sort((x, y) => x - y)[a.length >> 1]! * 1000);
  t.comment(`state link, 1.3 KB blob, ${n} rounds: median store ${median(st)} µs, median load ${median(ld)} µs`);
  t.pass('measured');
});
