// Grant table across real processes: shared bytes and every permission rule.
import t from 'tap';
import fs from 'node:fs';
import { Agent, withAuthority } from './agent.ts';

t.test('grant table: two processes share a page; each rule refused with its typed error', async (t) => {
  const env = await withAuthority();
  const a = await Agent.spawn();
  const b = await Agent.spawn();
  const c = await Agent.spawn();
  t.teardown(async () => {
    await Promise.all([a.kill(), b.kill(), c.kill()]);
    await env.done();
  });
  const ja = await a.call('join', { dir: env.dir });
  const bd = (await b.call('join', { dir: env.dir })).domid;
  const cd = (await c.call('join', { dir: env.dir })).domid;
  t.equal(fs.statSync(ja.mem).mode & 0o777, 0o600, 'domain memory file is mode 0600');
  t.equal(fs.statSync(env.dir).mode & 0o777, 0o700, 'runtime dir is mode 0700');

  const { page } = await a.call('page', { data: 'deadbeef0102' });
  const { ref } = await a.call('grant', { domid: bd, page, readonly: false });
  const m = await b.call('map', { granter: ja.domid, ref, writable: true, len: 6 });
  t.equal(m.data, 'deadbeef0102', 'grantee reads the granter’s bytes');
  await b.call('write', { id: m.id, data: 'cafe' });
  t.equal((await a.call('readPage', { page, len: 2 })).data, 'cafe', 'granter sees the grantee’s write (no copy)');

  t.equal(await c.code('map', { granter: ja.domid, ref, writable: false }), 'EPERM', 'mapping a ref granted to someone else → EPERM');
  t.equal(await a.code('end', { ref }), 'EBUSY', 'endAccess while mapped → EBUSY');
  t.equal(await b.code('map', { granter: ja.domid, ref: 999999, writable: false }), 'EINVAL', 'ref out of range → EINVAL');
  t.equal(await b.code('map', { granter: ja.domid, ref: 77, writable: false }), 'ENOENT', 'ref never granted → ENOENT');
  t.equal(await a.code('end', { ref: 77 }), 'ENOENT', 'ending a ref never granted → ENOENT');
  t.equal(await b.code('map', { granter: 4242, ref: 1, writable: false }), 'ENOENT', 'unknown granter → ENOENT');

  const ro = await a.call('page', { data: '11' });
  const { ref: roRef } = await a.call('grant', { domid: bd, page: ro.page, readonly: true });
  t.equal(await b.code('map', { granter: ja.domid, ref: roRef, writable: true }), 'EPERM', 'writable map of a read-only grant → EPERM');
  const rm = await b.call('map', { granter: ja.domid, ref: roRef, writable: false, len: 1 });
  t.equal(rm.data, '11', 'read-only map of a read-only grant works');
  await b.call('unmap', { id: rm.id });
  t.equal(await a.code('end', { ref: roRef }), 'ok', 'endAccess after unmap works');
  t.equal(await b.code('map', { granter: ja.domid, ref: roRef, writable: false }), 'ENOENT', 'an ended grant cannot be mapped');

  // the grantee dies while mapping: its mapping is released, endAccess succeeds
  await b.kill();
  await new Promise((r) => setTimeout(r, 200));
  t.equal(await a.code('end', { ref }), 'ok', 'a dead grantee’s mappings are released');

  // the granter dies: its pages are freed (file unlinked) and its refs are gone
  const { ref: ref2 } = await a.call('grant', { domid: cd, page, readonly: false });
  await a.kill();
  await new Promise((r) => setTimeout(r, 200));
  t.notOk(fs.existsSync(ja.mem), 'a dead domain’s memory file is removed');
  t.equal(await c.code('map', { granter: ja.domid, ref: ref2, writable: false }), 'ENOENT', 'mapping from a dead domain → ENOENT');
});
