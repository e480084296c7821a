// EvtchnMux (Xen's 2-level event channels): one worker thread waits for 110 ports of 11
// domains at once; the notifies come from another domain (this process's main thread and,
// for the dead-peer case, a child process), through real shared files and futexes.
import t from 'tap';
import path from 'node:path';
import { MessageChannel, type Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { startWorker } from '../../drivers/base/modules.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { EvtchnMux } from '../../drivers/xen/evtchn-mux.ts';
import { Agent, withAuthority } from './agent.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const DOMAINS = 11;
const PER_DOMAIN = 10;

type Report = { up?: number[]; ready?: number[]; err?: string; slot?: number; timeout?: boolean; control?: boolean; done?: boolean };

/** The worker's reports, awaited one predicate at a time. */
class Reports {
  private readonly queue: Report[] = [];
  private waiter: (() => void) | null = null;
  constructor(w: Worker) {
    w.on('message', (m: Report) => {
      this.queue.push(m);
      this.waiter?.();
    });
  }
  async next(ms = 10_000): Promise<Report> {
    const deadline = Date.now() + ms;
    while (this.queue.length === 0) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('no report from the mux worker');
      await new Promise<void>((r) => {
        const timer = setTimeout(r, left);
        this.waiter = () => (clearTimeout(timer), r());
      });
      this.waiter = null;
    }
    return this.queue.shift()!;
  }
  get pending(): number {
    return this.queue.length;
  }
}

t.test('one thread, 110 ports of 11 domains: every event once, masks, closes, a dead peer, a stop', async (t) => {
  const env = await withAuthority();
  const sender = await Domain.join(env.dir, { name: 'sender' });
  const waiters: Domain[] = [];
  for (let i = 0; i < DOMAINS; i++) waiters.push(await Domain.join(env.dir, { name: `w${i}` }));
  const agent = await Agent.spawn();
  let worker: Worker | undefined;
  t.teardown(async () => {
    await worker?.terminate();
    await agent.kill();
    for (const d of waiters) await d.leave();
    await sender.leave();
    await env.done();
  });

  // each waiter domain offers PER_DOMAIN ports to the sender (as a front end would)
  const params = [];
  const senderPorts: number[] = [];
  for (const d of waiters) {
    for (let k = 0; k < PER_DOMAIN; k++) {
      const p = d.evtchn.allocUnbound(sender.domid);
      senderPorts.push(await sender.evtchn.bindInterdomain(d.domid, p));
      params.push(d.evtchn.params(p));
    }
  }
  // and one to the child process, whose death the mux must see
  const agentDom = (await agent.call('join', { dir: env.dir })).domid as number;
  const pAgent = waiters[3]!.evtchn.allocUnbound(agentDom);
  await agent.call('evBind', { remote: waiters[3]!.domid, port: pAgent });
  params.push(waiters[3]!.evtchn.params(pAgent));

  const control = new MessageChannel();
  worker = startWorker(path.join(here, 'mux-worker.ts'), { workerData: { params, control: control.port2 }, transferList: [control.port2] });
  const reports = new Reports(worker);
  const slots = (await reports.next(20_000)).up!;
  t.equal(new Set(slots).size, params.length, `${params.length} ports added, each its own slot`);
  const command = async (c: Record<string, unknown>): Promise<void> => {
    control.port1.postMessage(c);
    sender.evtchn.notify(senderPorts[0]!);
    t.same(await reports.next(), { control: true }, `command ${String(c.op)} taken`);
  };

  // every port once: one report each, no port twice (the control port is slot 0)
  const seen = new Map<number, number>();
  for (let i = 1; i < DOMAINS * PER_DOMAIN; i++) sender.evtchn.notify(senderPorts[i]!);
  let total = 0;
  while (total < DOMAINS * PER_DOMAIN - 1) {
    const r = await reports.next();
    for (const s of r.ready ?? []) seen.set(s, (seen.get(s) ?? 0) + 1), total++;
  }
  t.equal(seen.size, DOMAINS * PER_DOMAIN - 1, 'each of the 109 notified ports reported');
  t.ok([...seen.values()].every((c) => c === 1), 'each exactly once');

  // ping-pong on 20 ports: the next notify only after the report, 100 rounds each; a lost
  // wake-up would hang (the report times out), a doubled one shows in the counts
  const ROUNDS = 100;
  const active = Array.from({ length: 20 }, (_, i) => 1 + i * 5);
  const count = new Map<number, number>(active.map((i) => [slots[i]!, 0]));
  for (const i of active) sender.evtchn.notify(senderPorts[i]!);
  let outstanding = active.length;
  while (outstanding > 0) {
    const r = await reports.next();
    for (const s of r.ready ?? []) {
      const c = count.get(s)! + 1;
      count.set(s, c);
      if (c < ROUNDS) sender.evtchn.notify(senderPorts[slots.indexOf(s)]!);
      else outstanding--;
    }
  }
  t.ok([...count.values()].every((c) => c === ROUNDS), `${active.length} ports × ${ROUNDS} ping-pongs: every notify reported once`);

  // coalescing and masks: a masked port raises nothing; unmask delivers its one event
  await command({ op: 'timeout', ms: 300 });
  await command({ op: 'mask', slot: slots[7] });
  for (let k = 0; k < 5; k++) sender.evtchn.notify(senderPorts[7]!);
  t.same(await reports.next(), { timeout: true }, 'five notifies on a masked port: no wake-up');
  await command({ op: 'unmask', slot: slots[7] });
  t.same(await reports.next(), { ready: [slots[7]] }, 'unmask: the five coalesce into one report');
  t.same(await reports.next(), { timeout: true }, 'and nothing more');
  await command({ op: 'timeout', ms: Infinity });

  // a close wakes the waiter with ECLOSED for that slot
  sender.evtchn.close(senderPorts[42]!);
  t.same(await reports.next(), { err: 'ECLOSED', slot: slots[42] }, 'a closed port: ECLOSED with its slot');

  // the peer process dies: the authority closes its channels, the mux reports it
  await agent.kill('SIGKILL');
  t.same(await reports.next(), { err: 'ECLOSED', slot: slots[params.length - 1] }, "a dead peer's port: ECLOSED");

  // the other ports still work after all that
  sender.evtchn.notify(senderPorts[99]!);
  t.same(await reports.next(), { ready: [slots[99]] }, 'the others still deliver');

  // a stop from another thread
  EvtchnMux.interruptFrom(params[5]!);
  t.same(await reports.next(), { err: 'ECANCELED', slot: -1 }, 'interruptFrom: ECANCELED');
  t.same(await reports.next(), { done: true }, 'the worker ends');
  t.equal(reports.pending, 0, 'no stray report');
});

t.test('a close the mux found but had not reported yet goes with remove(): no report for a removed (or reused) slot', async (t) => {
  const env = await withAuthority();
  const sender = await Domain.join(env.dir, { name: 'sender-r' });
  const waiter = await Domain.join(env.dir, { name: 'waiter-r' });
  t.teardown(async () => {
    await waiter.leave();
    await sender.leave();
    await env.done();
  });
  const pair = async () => {
    const offered = sender.evtchn.allocUnbound(waiter.domid);
    const bound = await waiter.evtchn.bindInterdomain(sender.domid, offered);
    return { offered, bound };
  };
  const a = await pair();
  const b = await pair();
  const mux = new EvtchnMux();
  const sa = mux.add(waiter.evtchn.params(a.bound));
  const sb = mux.add(waiter.evtchn.params(b.bound));
  // One scan sees both: a's close (queued for a later report) and b's event (reported now).
  sender.evtchn.close(a.offered);
  sender.evtchn.notify(b.offered);
  t.equal(mux.waitAny(2000), 1, 'the event is reported first');
  t.equal(mux.ready[0], sb, 'for b');
  mux.remove(sa); // the caller drops a before the mux got round to reporting its close
  t.equal(mux.waitAny(100), 0, 'no close is reported for the removed slot');
  const c = await pair();
  const sc = mux.add(waiter.evtchn.params(c.bound));
  t.equal(mux.waitAny(100), 0, `a new port (slot ${sc}${sc === sa ? ', the removed one reused' : ''}) gets no stale close`);
  sender.evtchn.notify(c.offered);
  t.equal(mux.waitAny(2000), 1, 'and its own events arrive');
  t.equal(mux.ready[0], sc);
  mux.close();
});
