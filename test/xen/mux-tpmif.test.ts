// One worker thread serving 50 tpmif back ends over one EvtchnMux: 50 real xenbus/tpmif
// front ends in another process send TPM2 GetRandom commands, all 50 in flight at once,
// answered by real libtpms engines (5 private library copies, 10 channels each).
import t from 'tap';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Worker } from 'node:worker_threads';
import { startWorker } from '../../drivers/base/modules.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { XenbusBack } from '../../drivers/tpmback/xenbus-back.ts';
import type { TpmifParams } from '../../drivers/xen/tpmif-page.ts';
import { Agent, withAuthority } from './agent.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHANNELS = 50;
const ENGINES = 5;
const ROUNDS = 40;

t.test(`one mux thread serves ${CHANNELS} tpmif back ends on ${ENGINES} libtpms engines`, async (t) => {
  const env = await withAuthority();
  const backDom = await Domain.join(env.dir, { name: 'grouped-vtpmd' });
  const guest = await Agent.spawn();
  let worker: Worker | undefined;
  t.teardown(async () => {
    await worker?.terminate();
    await guest.kill();
    await backDom.leave();
    await env.done();
  });
  const guestDom = (await guest.call('join', { dir: env.dir })).domid as number;
  const links: Promise<TpmifParams>[] = [];
  for (let devid = 0; devid < CHANNELS; devid++) {
    const back = await XenbusBack.start(backDom, { frontId: guestDom, devid, uuid: '00000000-0000-4000-8000-000000000000' });
    links.push(new Promise((resolve) => back.onConnect((l) => resolve(l.params))));
  }
  t.equal((await guest.call('manyFronts', { backendId: backDom.domid, n: CHANNELS })).n, CHANNELS, `${CHANNELS} front ends connected`);
  const params = await Promise.all(links);

  worker = startWorker(path.join(here, 'mux-serve-worker.ts'), { workerData: { links: params, engines: ENGINES } });
  const result = new Promise<Record<string, any>>((resolve, reject) => {
    worker!.on('message', (m) => {
      if (!m.up) resolve(m);
    });
    worker!.once('error', reject);
  });
  const r = await guest.call('manyBatch', { rounds: ROUNDS });
  t.equal(r.bad, 0, `${r.commands} GetRandom answered (rc 0, 16 bytes), ${CHANNELS} in flight at a time (${Math.round(r.ms)} ms, ${((r.ms * 1000) / r.commands).toFixed(0)} µs per command)`);

  // the guest's front ends go away: every channel closes and the worker reports each
  await guest.call('manyClose');
  const done = await result;
  t.equal(done.served, CHANNELS * ROUNDS, 'the mux thread served every command, once');
  t.same(done.perEngine, new Array(ENGINES).fill((CHANNELS / ENGINES) * ROUNDS), 'spread over the engines as routed');
  t.equal(done.closed, CHANNELS, 'each closed channel reported ECLOSED once');
  t.equal(done.why, 'all closed', 'the worker ended when the last channel closed');
});
