// The tpm-dev core alone: every Linux /dev/tpm0 rule, driven with a controllable clock.
import t from 'tap';
import { E2BIG, EBADF, EBUSY, EINVAL, EIO, TpmDevCore } from '../../drivers/tpmfront/tpmdev.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

const cmd = tpm2.getRandom(16);
const rsp = Uint8Array.from([0x80, 0x01, 0, 0, 0, 0x0e, 0, 0, 0, 0, 0, 2, 0xaa, 0xbb]);

function core(over: { now?: () => number; graceMs?: number; responseTimeoutMs?: number } = {}) {
  return new TpmDevCore(over);
}

t.test('one opener; handles start at 1; release frees the node', async (t) => {
  const c = core();
  const h = c.open();
  t.equal(h, 1);
  t.equal(c.open(), -EBUSY);
  c.release(h);
  const h2 = c.open();
  t.equal(h2, 2);
  t.equal(c.graceMs, 250);
});

t.test('shared (tpmrm-style) allows many openers, each with its own buffer', async (t) => {
  const c = new TpmDevCore({ shared: true });
  const a = c.open();
  const b = c.open();
  t.ok(a > 0 && b > 0 && a !== b);
  t.same('command' in c.startWrite(a, cmd), true);
  t.equal(c.complete(a, cmd.length, rsp), cmd.length);
  t.notOk(c.readable(b));
  t.ok(c.readable(a));
});

t.test('write validation in Linux order: E2BIG, EBUSY, EINVAL', async (t) => {
  const c = core();
  const h = c.open();
  t.same(c.startWrite(h, new Uint8Array(4097)), { errno: E2BIG });
  t.same(c.startWrite(h, new Uint8Array(9)), { errno: EINVAL });
  const wrongSize = cmd.slice();
  wrongSize[5] = wrongSize[5]! + 1;
  t.same(c.startWrite(h, wrongSize), { errno: EINVAL });
  t.same(c.startWrite(h, cmd.subarray(0, 11)), { errno: EINVAL });
  const ok = c.startWrite(h, cmd);
  t.ok('command' in ok && ok.command === cmd, 'the command is the written bytes, not a copy');
  t.same(c.startWrite(h, cmd), { errno: EBUSY }, 'a command in flight');
  t.equal(c.complete(h, cmd.length, rsp), cmd.length);
  t.same(c.startWrite(h, cmd), { errno: EBUSY }, 'a response unread');
  t.same(c.startWrite(h, new Uint8Array(5000)), { errno: E2BIG }, 'E2BIG before EBUSY, as Linux');
  t.same(c.startWrite(99, cmd), { errno: EBADF });
});

t.test('reads: partial, then the rest, then 0; offsets are not a concept here', async (t) => {
  const c = core();
  const h = c.open();
  t.equal((c.read(h, 100) as Uint8Array).length, 0, 'nothing pending reads 0');
  c.startWrite(h, cmd);
  c.complete(h, cmd.length, rsp);
  t.ok(c.readable(h));
  t.same([...(c.read(h, 10) as Uint8Array)], [...rsp.subarray(0, 10)]);
  t.same([...(c.read(h, 3) as Uint8Array)], [...rsp.subarray(10, 13)]);
  t.same([...(c.read(h, 4096) as Uint8Array)], [...rsp.subarray(13)]);
  t.equal((c.read(h, 4096) as Uint8Array).length, 0);
  t.notOk(c.readable(h));
  t.ok('command' in c.startWrite(h, cmd), 'writable again once drained');
  t.equal(c.read(42, 10), -EBADF);
});

t.test('backend failure: EIO and the file stays usable; short response is EIO too', async (t) => {
  const c = core();
  const h = c.open();
  c.startWrite(h, cmd);
  t.equal(c.fail(h), -EIO);
  c.startWrite(h, cmd);
  t.equal(c.complete(h, cmd.length, new Uint8Array(3)), -EIO);
  t.ok('command' in c.startWrite(h, cmd));
});

t.test('release drops the response, also one still in flight', async (t) => {
  const c = core();
  const h = c.open();
  c.startWrite(h, cmd);
  c.complete(h, cmd.length, rsp);
  c.release(h);
  const h2 = c.open();
  t.equal((c.read(h2, 100) as Uint8Array).length, 0, 'the new opener sees nothing');
  c.startWrite(h2, cmd);
  c.release(h2);
  t.equal(c.complete(h2, cmd.length, rsp), -EBADF, 'arrives after release: dropped');
  t.equal(c.openCount, 0);
});

t.test('an unread response is dropped after the timeout', async (t) => {
  let now = 0;
  const c = core({ now: () => now, responseTimeoutMs: 1000 });
  const h = c.open();
  c.startWrite(h, cmd);
  c.complete(h, cmd.length, rsp);
  now = 999;
  t.ok(c.readable(h));
  now = 1000;
  t.notOk(c.readable(h));
  t.equal((c.read(h, 100) as Uint8Array).length, 0);
  t.ok('command' in c.startWrite(h, cmd), 'a write is accepted again');
});

t.test('the core keeps its own copy of a response (the transport reuses its buffer)', async (t) => {
  const c = new TpmDevCore({ shared: true });
  const a = c.open();
  const b = c.open();
  const reused = new Uint8Array(rsp);
  c.startWrite(a, cmd);
  t.equal(c.complete(a, cmd.length, reused), cmd.length);
  reused.fill(0x55); // the next command's response lands in the same buffer
  c.startWrite(b, cmd);
  c.complete(b, cmd.length, reused);
  t.same(Array.from(c.read(a, 4096) as Uint8Array), Array.from(rsp), 'file a reads its own response');
  t.same(Array.from(c.read(b, 4096) as Uint8Array), Array.from(reused), 'file b reads its own');
});

t.test('fail() carries the errno a resource manager refused with', async (t) => {
  const c = new TpmDevCore({ shared: true });
  const a = c.open();
  c.startWrite(a, cmd);
  t.equal(c.fail(a, EINVAL), -EINVAL);
  t.same('command' in c.startWrite(a, cmd), true, 'usable again');
  t.equal(c.fail(a), -EIO, 'EIO by default');
});
