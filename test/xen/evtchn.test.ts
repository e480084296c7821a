// Futex event channels between real processes.
import t from 'tap';
import { Agent, withAuthority } from './agent.ts';
import { Domain } from '../../drivers/xen/domain.ts';

const PINGPONGS = Number(process.env.VTPM_EVTCHN_PINGPONGS ?? 100_000);

async function pair(t: { teardown(fn: () => unknown): void }) {
  const env = await withAuthority();
  const a = await Agent.spawn();
  const b = await Agent.spawn();
  t.teardown(async () => {
    await Promise.all([a.kill(), b.kill()]);
    await env.done();
  });
  const ad = (await a.call('join', { dir: env.dir })).domid;
  const bd = (await b.call('join', { dir: env.dir })).domid;
  const pa = (await a.call('evAlloc', { remote: bd })).port;
  const pb = (await b.call('evBind', { remote: ad, port: pa })).port;
  return { env, a, b, ad, bd, pa, pb };
}

t.test(`${PINGPONGS} notify/wait ping-pongs between two processes, none lost or doubled`, async (t) => {
  const { a, b, ad, bd, pa, pb } = await pair(t);
  const { page } = await a.call('page', {});
  const { ref } = await a.call('grant', { domid: bd, page, readonly: false });
  const m = await b.call('map', { granter: ad, ref, writable: true });
  const [ra, rb] = await Promise.all([
    a.call('pingpong', { port: pa, page, n: PINGPONGS, first: true }),
    b.call('pingpong', { port: pb, map: m.id, n: PINGPONGS, first: false }),
  ]);
  t.equal(ra.errors + rb.errors, 0, `every wake-up matched its notify (${Math.round(ra.ms)} ms, ${((ra.ms * 1000) / PINGPONGS).toFixed(1)} µs per round trip)`);
  await new Promise((r) => setTimeout(r, 50));
  t.equal((await a.call('evPoll', { port: pa })).pending, false, 'no extra event left on side A');
  t.equal((await b.call('evPoll', { port: pb })).pending, false, 'no extra event left on side B');
});

t.test('a notify while the peer is busy is not lost; bad ports are refused', async (t) => {
  const { a, b, pa, pb } = await pair(t);
  await a.call('evNotify', { port: pa });
  await new Promise((r) => setTimeout(r, 100));
  const w = await b.call('evWait', { port: pb, timeoutMs: 1000 });
  t.ok(w.ms < 50, 'the event sent before the wait is delivered at once');
  t.equal(await b.code('evWait', { port: pb, timeoutMs: 100 }), 'ETIMEDOUT', 'no event → ETIMEDOUT');
  t.equal(await b.code('evNotify', { port: 99 }), 'ENOENT', 'unknown port → ENOENT');
  t.equal(await b.code('evBind', { remote: 1, port: pa }), 'EBUSY', 'binding an already-bound port → EBUSY');
  const p2 = (await a.call('evAlloc', { remote: 4000 })).port;
  t.equal(await b.code('evBind', { remote: 1, port: p2 }), 'EPERM', 'binding a port offered to another domain → EPERM');
  const late = b.call('evWaitAsync', { port: pb, timeoutMs: 5000 });
  await new Promise((r) => setTimeout(r, 50));
  await a.call('evNotify', { port: pa });
  t.ok((await late).ms < 1000, 'the event-loop form wakes on notify');
});

t.test("a stop aimed at a closed channel does not stop the next channel on its record", async (t) => {
  const { a, b, ad, bd, pa, pb } = await pair(t);
  const { params } = await b.call('evParams', { port: pb });
  await b.call('evClose', { port: pb });
  await a.call('evClose', { port: pa });
  await b.call('evInterrupt', { params }); // late: the channel is gone
  const pa2 = (await a.call('evAlloc', { remote: bd })).port;
  t.equal(pa2, pa, 'the record is reused by the next channel');
  const pb2 = (await b.call('evBind', { remote: ad, port: pa2 })).port;
  t.equal(await b.code('evWait', { port: pb2, timeoutMs: 200 }), 'ETIMEDOUT', 'its waiter sleeps until a notify (not ECANCELED)');
  await a.call('evNotify', { port: pa2 });
  t.ok((await b.call('evWait', { port: pb2, timeoutMs: 1000 })).ms < 500, 'and wakes on one');
});

t.test('closing a port wakes the waiter with ECLOSED', async (t) => {
  const { a, b, pa, pb } = await pair(t);
  const waiting = b.code('evWait', { port: pb, timeoutMs: 10_000 });
  await new Promise((r) => setTimeout(r, 100));
  const t0 = Date.now();
  await a.call('evClose', { port: pa });
  t.equal(await waiting, 'ECLOSED', 'waiter wakes with ECLOSED');
  t.ok(Date.now() - t0 < 1000, 'promptly');
  t.equal(await b.code('evNotify', { port: pb }), 'ECLOSED', 'notify on a closed channel → ECLOSED');
});

t.test('a peer killed while the other waits: the waiter wakes with an error', async (t) => {
  const { a, b, pb } = await pair(t);
  const waiting = b.code('evWait', { port: pb, timeoutMs: 20_000 });
  const waitingAsync = b.code('evWaitAsync', { port: pb, timeoutMs: 20_000 });
  await new Promise((r) => setTimeout(r, 100));
  const t0 = Date.now();
  await a.kill('SIGKILL');
  t.equal(await waiting, 'ECLOSED', 'blocking waiter wakes with ECLOSED');
  t.equal(await waitingAsync, 'ECLOSED', 'event-loop waiter wakes with ECLOSED');
  t.ok(Date.now() - t0 < 2000, `within ${Date.now() - t0} ms`);
});

t.test("the waiter's own peer watch (pidfd) wakes it even with the authority gone", async (t) => {
  const { env, a, b, pb } = await pair(t);
  // SIGKILL: nobody is left to close channels on the dead domain's behalf
  env.auth.child.kill('SIGKILL');
  await new Promise((r) => env.auth.child.once('exit', r));
  // in a worker, as the daemons wait: the watch runs on the process's event loop
  const waiting = b.code('evWaitWorker', { port: pb, timeoutMs: 20_000 });
  const waitingAsync = b.code('evWaitAsync', { port: pb, timeoutMs: 20_000 });
  await new Promise((r) => setTimeout(r, 300));
  const t0 = Date.now();
  await a.kill('SIGKILL');
  t.equal(await waitingAsync, 'ECLOSED', 'the event-loop waiter too');
  t.equal(await waiting, 'ECLOSED', "waiter wakes with ECLOSED from its process's pidfd watch");
  t.ok(Date.now() - t0 < 1000, `at once, with no wait slice (${Date.now() - t0} ms)`);
});

t.test('event-loop handlers: on(port) runs the handler per event and reports the close', async (t) => {
  const env = await withAuthority();
  const d1 = await Domain.join(env.dir);
  const d2 = await Domain.join(env.dir);
  t.teardown(async () => {
    await d2.leave();
    await d1.leave();
    await env.done();
  });
  const p1 = d1.evtchn.allocUnbound(d2.domid);
  const p2 = await d2.evtchn.bindInterdomain(d1.domid, p1);
  let count = 0;
  const closed = new Promise<string>((resolve) => {
    d2.evtchn.on(p2, () => {
      count++;
      if (count < 5) d2.evtchn.notify(p2);
    }, (e) => resolve(e.code));
  });
  // d1 echoes every event back until d2 stops
  const off = d1.evtchn.on(p1, () => {
    if (count < 5) d1.evtchn.notify(p1);
  });
  d1.evtchn.notify(p1);
  while (count < 5) await new Promise((r) => setTimeout(r, 10));
  t.equal(count, 5, 'five events handled on the event loop');
  off();
  d1.evtchn.close(p1);
  t.equal(await closed, 'ECLOSED', 'the close reaches the error callback');
});
