// Xenstore served by the authority process: permissions, watches, transactions, bad input.
import t from 'tap';
import net from 'node:net';
import { encode } from 'cbor-x';
import { Domain } from '../../drivers/xen/domain.ts';
import { socketPath } from '../../drivers/xen/layout.ts';
import { FrameReader, encodeFrame, MAX_FRAME, PROTO_VERSION } from '../../drivers/base/frame.ts';
import { withAuthority } from './agent.ts';

const codeOf = async (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (e) => e.code);

t.test('xenstore: keys, permissions, watches, transactions', async (t) => {
  const env = await withAuthority();
  const d0 = await Domain.join(env.dir, { host: true });
  const g1 = await Domain.join(env.dir);
  const g2 = await Domain.join(env.dir);
  t.teardown(async () => {
    for (const d of [g2, g1, d0]) await d.leave();
    await env.done();
  });
  t.equal(d0.domid, 0, 'the host joins as domain 0');
  t.equal(await codeOf(Domain.join(env.dir, { host: true })), 'EBUSY', 'a second process cannot claim domain 0');
  const me = `/local/domain/${g1.domid}`;
  await g1.store.write(`${me}/a/b`, 'x');
  t.equal(await g1.store.read(`${me}/a/b`), 'x', 'write then read');
  t.same(await g1.store.list(`${me}/a`), ['b'], 'list');
  await g1.store.mkdir(`${me}/dir`);
  t.same(await g1.store.list(me), ['a', 'dir'], 'mkdir');
  t.equal(await codeOf(g1.store.read(`${me}/nope`)), 'ENOENT', 'missing key → ENOENT');
  t.equal(await codeOf(g2.store.read(`${me}/a/b`)), 'EPERM', 'another guest cannot read my keys');
  t.equal(await codeOf(g2.store.write(`${me}/a/b`, 'y')), 'EPERM', 'another guest cannot write my subtree');
  t.equal(await codeOf(g1.store.write('/local/domain/0/x', 'y')), 'EPERM', 'a guest cannot write the host’s subtree');
  t.equal(await codeOf(g1.store.write('/elsewhere', 'y')), 'EPERM', 'a guest cannot write outside its subtree');
  t.equal(await codeOf(g1.store.write('bad//path', 'y')), 'EINVAL', 'malformed path → EINVAL');
  t.equal(await d0.store.read(`${me}/a/b`), 'x', 'domain 0 reads everything');
  await g1.store.setPerms(`${me}/a`, [{ dom: g1.domid, perm: 'n' }, { dom: g2.domid, perm: 'r' }]);
  t.equal(await g2.store.read(`${me}/a`), '', 'a key shared for reading can be read');
  t.equal(await codeOf(g2.store.write(`${me}/a`, 'z')), 'EPERM', '…but not written');
  t.equal(await codeOf(g2.store.setPerms(`${me}/a`, [{ dom: g2.domid, perm: 'b' }])), 'EPERM', 'only the owner changes perms');

  // watches fire on change under the path (and once at registration)
  const seen: string[] = [];
  const unwatch = await g1.store.watch(`${me}/w`, (p) => seen.push(p));
  await g1.store.write(`${me}/w/k1`, '1');
  await g1.store.write(`${me}/other`, '1');
  await g1.store.rm(`${me}/w`);
  await new Promise((r) => setTimeout(r, 100));
  t.same(seen, [`${me}/w`, `${me}/w`, `${me}/w/k1`, `${me}/w/k1`, `${me}/w`], 'watch events: registration, create parent+key, removal');
  await unwatch();
  // Matched by path (the authority indexes watches by path and walks a change's ancestors).
  const deep: string[] = [];
  const unDeep = await g1.store.watch(`${me}/p`, (p) => deep.push(p));
  const all: string[] = [];
  const unAll = await g1.store.watch('/', (p) => all.push(p));
  await g1.store.write(`${me}/p/q/r`, '1');
  await g1.store.write(`${me}/pq`, '1');
  await new Promise((r) => setTimeout(r, 100));
  t.ok(deep.includes(`${me}/p/q/r`), 'a watch sees a change two levels below it');
  t.notOk(deep.includes(`${me}/pq`), 'but not a sibling that shares its prefix');
  t.ok(all.includes(`${me}/p/q/r`) && all.includes(`${me}/pq`), 'a watch on / sees every change');
  await unDeep();
  await unAll();
  const seenBefore = deep.length;
  await g1.store.write(`${me}/p/q/r`, '2');
  await new Promise((r) => setTimeout(r, 100));
  t.equal(deep.length, seenBefore, 'no event after unwatch');
  const hidden: string[] = [];
  const un2 = await g2.store.watch(me, (p) => hidden.push(p));
  await g1.store.write(`${me}/secret`, 's');
  await new Promise((r) => setTimeout(r, 100));
  t.notOk(hidden.includes(`${me}/secret`), 'a watcher is not told about keys it may not read');
  await un2();

  // transactions: atomic, and a conflicting change makes the transaction retry
  let runs = 0;
  await g1.store.write(`${me}/n`, '1');
  await g1.store.transaction(async (tx) => {
    runs++;
    const n = Number(await tx.read(`${me}/n`));
    if (runs === 1) await g1.store.write(`${me}/n`, '10'); // a concurrent writer
    tx.write(`${me}/n`, String(n + 1));
    tx.write(`${me}/m`, String(n + 1));
  });
  t.equal(runs, 2, 'a conflicting write made the transaction run again');
  t.equal(await g1.store.read(`${me}/n`), '11', 'then it committed on fresh data');
  t.equal(await g1.store.read(`${me}/m`), '11', 'both keys written');
  const code = await codeOf(
    g1.store.transaction(async (tx) => {
      tx.write(`${me}/t1`, 'a');
      tx.write('/local/domain/0/t2', 'b');
    }),
  );
  t.equal(code, 'EPERM', 'a transaction with one forbidden write fails…');
  t.equal(await g1.store.readOpt(`${me}/t1`), undefined, '…and none of its writes happened');
  // A failed transaction also undoes changes to what existed: a value, a removed subtree.
  await g1.store.write(`${me}/keep/a/b`, 'deep');
  await g1.store.write(`${me}/n`, 'before');
  const undone = await codeOf(
    g1.store.transaction(async (tx) => {
      tx.write(`${me}/n`, 'after');
      tx.rm(`${me}/keep`);
      tx.write(`${me}/keep/new`, 'x');
      tx.write('/local/domain/0/t3', 'b');
    }),
  );
  t.equal(undone, 'EPERM', 'a transaction that overwrites, removes, recreates, then fails…');
  t.equal(await g1.store.read(`${me}/n`), 'before', '…leaves the value it overwrote');
  t.equal(await g1.store.read(`${me}/keep/a/b`), 'deep', '…and the subtree it removed');
  t.same((await g1.store.list(`${me}/keep`)).sort(), ['a'], '…without what it created there');
});

function rawClient(dir: string): { sock: net.Socket; replies: Record<string, unknown>[]; closed: Promise<void> } {
  const sock = net.connect(socketPath(dir));
  const replies: Record<string, unknown>[] = [];
  const r = new FrameReader();
  sock.on('data', (c) => {
    for (const x of r.push(c)) if ('msg' in x) replies.push(x.msg);
  });
  sock.on('error', () => {});
  const closed = new Promise<void>((res) => sock.on('close', () => res()));
  return { sock, replies, closed };
}
const settle = () => new Promise((r) => setTimeout(r, 150));

t.test('bad input on the socket: error replies, the server keeps serving others', async (t) => {
  const env = await withAuthority();
  const good = await Domain.join(env.dir);
  t.teardown(async () => {
    await good.leave();
    await env.done();
  });
  const c = rawClient(env.dir);
  // garbage that is a well-framed but undecodable body
  const junk = Buffer.from([0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
  c.sock.write(junk);
  // a CBOR body that is not a map, a wrong version, an unknown op, a request before hello
  for (const body of [encode([1, 2, 3]), encode({ v: 99, id: 1, op: 'ping' })]) {
    const h = Buffer.alloc(4);
    h.writeUInt32BE(body.length);
    c.sock.write(Buffer.concat([h, body]));
  }
  c.sock.write(encodeFrame({ v: PROTO_VERSION, id: 2, op: 'frobnicate' }));
  c.sock.write(encodeFrame({ v: PROTO_VERSION, id: 3, op: 'read', path: '/local' }));
  c.sock.write(encodeFrame({ v: PROTO_VERSION, id: 4, op: 'ping' }));
  await settle();
  t.same(c.replies.map((m) => m.err ?? 'ok'), ['EPROTO', 'EPROTO', 'EPROTO', 'EINVAL', 'EPERM', 'ok'], 'each bad frame gets its error reply; the connection goes on');
  // an oversized frame: EOVERSIZE, that connection closed
  const big = Buffer.alloc(4);
  big.writeUInt32BE(MAX_FRAME + 1);
  c.sock.write(big);
  await c.closed;
  t.equal(c.replies.at(-1)!.err, 'EOVERSIZE', 'oversized frame → EOVERSIZE, then that connection is closed');
  // a byte-stream of random garbage on another connection
  const g = rawClient(env.dir);
  g.sock.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
  await g.closed;
  t.equal(g.replies.at(-1)!.err, 'EOVERSIZE', 'text garbage reads as a huge length → refused');
  await good.store.write(`/local/domain/${good.domid}/still`, 'here');
  t.equal(await good.store.read(`/local/domain/${good.domid}/still`), 'here', 'other clients are served throughout');
  t.equal(await codeOf(good.store.write(`/local/domain/${good.domid}/big`, 'x'.repeat(70_000))), 'EOVERSIZE', 'the client refuses to send an oversized frame');
});
