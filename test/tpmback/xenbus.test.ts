// The xenbus handshake between a front end and a back end in separate processes.
import t from 'tap';
import { Domain } from '../../drivers/xen/domain.ts';
import { backPath, frontPath, retargetFront } from '../../drivers/xen/xenbus-common.ts';
import { Agent, withAuthority } from '../xen/agent.ts';

async function until(what: string, f: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function setup(t: any) {
  const env = await withAuthority();
  const d0 = await Domain.join(env.dir, { host: true }); // the toolstack's view
  const b = await Agent.spawn();
  const f = await Agent.spawn();
  const agents = [b, f];
  t.teardown(async () => {
    await Promise.all(agents.map((a) => a.kill()));
    await d0.leave();
    await env.done();
  });
  const bd = (await b.call('join', { dir: env.dir })).domid;
  const fd = (await f.call('join', { dir: env.dir })).domid;
  await b.call('back', { frontId: fd, uuid: '11111111-2222-4333-8444-555555555555' });
  const st = (p: string) => d0.store.readOpt(`${p}/state`);
  return { env, d0, b, f, bd, fd, agents, st };
}

t.test('handshake reaches Connected in two processes; front end closes', async (t) => {
  const { d0, b, f, bd, fd, st } = await setup(t);
  const bp = backPath(bd, fd, 0);
  const fp = frontPath(fd, 0);
  t.equal(await st(bp), '2', 'back end published InitWait');
  t.equal(await d0.store.read(`${bp}/uuid`), '11111111-2222-4333-8444-555555555555', 'back end published its uuid');
  t.equal((await f.call('front', { backendId: bd })).state, 4, 'front end Connected');
  await b.event((e) => e.ev === 'backConnected');
  t.equal(await st(bp), '4', 'back end Connected');
  t.equal(await d0.store.read(`${fp}/feature-protocol-v2`), '1', 'feature-protocol-v2 published');
  const ringRef = Number(await d0.store.read(`${fp}/ring-ref`));
  const port = Number(await d0.store.read(`${fp}/event-channel`));
  t.ok(ringRef > 0 && port > 0, `ring-ref ${ringRef} and event-channel ${port} published`);
  t.equal((await f.call('sendAsync', { data: '0102' })).data, '5b58', 'a command crosses');

  t.equal((await f.call('frontClose')).state, 6, 'front end Closed');
  await b.event((e) => e.ev === 'served' && e.done === 'closed');
  t.pass('the back end’s serve loop ended with the channel closed');
  await until('back end back to InitWait', async () => (await st(bp)) === '2');
  // the grant and the port are released: the back end could not map the old ref again
  t.equal(await f.code('end', { ref: ringRef }), 'ENOENT', 'front end ended its grant');
  t.equal(await f.code('evNotify', { port }), 'ENOENT', 'front end closed its port');
});

t.test('back end closes: both sides Closed and released; the front end reattaches', async (t) => {
  const { b, f, bd, fd, st } = await setup(t);
  await f.call('front', { backendId: bd });
  await b.event((e) => e.ev === 'backConnected');
  const fp = frontPath(fd, 0);
  t.equal((await b.call('backClose')).state, 6, 'back end Closed');
  await f.event((e) => e.ev === 'frontDisconnected');
  t.pass('front end saw the disconnect and tore down');
  await until('front end Initialising', async () => (await st(fp)) === '1');
  t.equal(await f.code('sendAsync', { data: '01' }), 'EXC', 'no link while disconnected');
  // the same back domain publishes InitWait again: the front end reconnects
  await b.call('back', { frontId: fd });
  t.equal((await f.call('frontConnected')).state, 4, 'front end reconnected to the restarted back end');
  t.equal((await f.call('sendAsync', { data: '00' })).data, '5a', 'commands flow again');
});

t.test('back end process killed and restarted: the front end reconnects', async (t) => {
  const { d0, env, b, f, bd, fd, agents } = await setup(t);
  await f.call('front', { backendId: bd });
  await b.kill('SIGKILL');
  await f.event((e) => e.ev === 'frontDisconnected');
  t.pass('front end noticed the dead back end');
  const b2 = await Agent.spawn();
  agents.push(b2);
  const bd2 = (await b2.call('join', { dir: env.dir })).domid;
  await b2.call('back', { frontId: fd });
  await retargetFront(d0.store, fd, 0, bd2); // the toolstack moves the device to the new vtpmd
  t.equal((await f.call('frontConnected')).state, 4, `front end Connected to the new back end (domain ${bd2})`);
  t.equal((await f.call('sendAsync', { data: 'ff' })).data, 'a5', 'commands flow through the new back end');
});
