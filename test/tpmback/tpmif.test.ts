// tpmif v2 across two processes, each side in a worker thread built from plain parameters.
import t from 'tap';
import { Agent, withAuthority } from '../xen/agent.ts';

t.test('tpmif: 10,000 random-size commands echoed intact; cancel; busy; oversize', async (t) => {
  const env = await withAuthority();
  const b = await Agent.spawn();
  const f = await Agent.spawn();
  t.teardown(async () => {
    await b.kill();
    await f.kill();
    await env.done();
  });
  const bd = (await b.call('join', { dir: env.dir })).domid;
  const fd = (await f.call('join', { dir: env.dir })).domid;
  await b.call('back', { frontId: fd });
  t.equal((await f.call('front', { backendId: bd })).state, 4, 'front Connected');
  await b.event((e) => e.ev === 'backConnected');
  const r = await f.call('frontBatch', { n: 10_000, seed: 7 });
  t.equal(r.bad, 0, `10,000 commands of 10..4096 bytes intact (${Math.round(r.ms)} ms)`);
  const reused = await f.call('frontBatch', { n: 2000, seed: 9, reuse: true, spinUs: 20 });
  t.equal(reused.bad, 0, '2,000 more intact with one reused response buffer and spinning before the futex wait');
  const c = await f.call('cancelTest');
  t.equal(c.second, 'EBUSY', 'a second submit while one is in flight is refused');
  t.equal(c.first, 'ECANCELED', 'the cancelled command reports ECANCELED');
  t.equal(c.after, Buffer.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map((x) => x ^ 0x5a)).toString('hex'), 'the channel works after cancel');
  t.equal((await f.call('oversize')).code, 'EOVERSIZE', 'a 4097-byte command is refused');
  const e = await f.call('sendAsync', { data: '00'.repeat(4096) });
  t.equal(e.data, '5a'.repeat(4096), 'a 4096-byte command (extra page) works from the event loop too');
  await b.call('backStop');
  t.equal((await b.event((e) => e.ev === 'served')).done, 'stopped', 'TpmifBack.stopFrom(params) from another thread ends serveSync with "stopped"');
  t.equal(await f.code('sendAsync', { data: '01', timeoutMs: 300 }), 'ETIMEDOUT', 'with nobody serving, a command times out');
});
