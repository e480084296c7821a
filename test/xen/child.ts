// A domain in its own process, driven by the test over IPC: {id, op, args} → {id, ok, result}
// or {id, err: code, msg}. Spawned with agent.ts.
import { EvtchnEndpoint } from '../../drivers/xen/evtchn.ts';
import type { Worker } from 'node:worker_threads';
import { startWorker } from '../../drivers/base/modules.ts';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Domain } from '../../drivers/xen/domain.ts';
import type { GrantMapping } from '../../drivers/xen/gnttab.ts';
import { XenbusBack } from '../../drivers/tpmback/xenbus-back.ts';
import { XenbusFront } from '../../drivers/tpmfront/xenbus-front.ts';
import { TpmifBack } from '../../drivers/tpmback/tpmif-back.ts';
import { isVtpmError, VtpmError, type VtpmErrorCode } from '../../drivers/base/errors.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
let dom: Domain;
const maps = new Map<number, GrantMapping>();
let nextMap = 1;
let back: XenbusBack | null = null;
let front: XenbusFront | null = null;
const fronts: XenbusFront[] = [];
let backWorker: Worker | null = null;
const send = (m: unknown): void => void process.send!(m);

function worker(data: unknown): Worker {
  return startWorker(path.join(here, 'echo-worker.ts'), { workerData: data });
}
function runWorker(data: unknown): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const w = worker(data);
    w.once('message', (m) => resolve(m));
    w.once('error', reject);
  });
}

const ops: Record<string, (a: any) => unknown> = {
  async join(a) {
    dom = await Domain.join(a.dir, { host: a.host === true });
    dom.onLost(() => send({ ev: 'lost' }));
    return { domid: dom.domid, mem: dom.memPath };
  },
  page(a) {
    const p = dom.gnttab.allocPage();
    Buffer.from(a.data ?? '', 'hex').copy(dom.gnttab.pageBuffer(p));
    return { page: p };
  },
  readPage(a) {
    return { data: dom.gnttab.pageBuffer(a.page).subarray(0, a.len).toString('hex') };
  },
  grant(a) {
    return { ref: dom.gnttab.grantAccess(a.domid, a.page, a.readonly === true) };
  },
  end(a) {
    dom.gnttab.endAccess(a.ref);
    return {};
  },
  async map(a) {
    const m = await dom.gnttab.map(a.granter, a.ref, a.writable === true);
    const id = nextMap++;
    maps.set(id, m);
    return { id, data: m.buf.subarray(0, a.len ?? 16).toString('hex') };
  },
  write(a) {
    Buffer.from(a.data, 'hex').copy(maps.get(a.id)!.buf);
    return {};
  },
  async unmap(a) {
    await dom.gnttab.unmap(maps.get(a.id)!);
    maps.delete(a.id);
    return {};
  },
  evAlloc(a) {
    return { port: dom.evtchn.allocUnbound(a.remote) };
  },
  async evBind(a) {
    return { port: await dom.evtchn.bindInterdomain(a.remote, a.port) };
  },
  evNotify(a) {
    dom.evtchn.notify(a.port);
    return {};
  },
  evWait(a) {
    const t = performance.now();
    dom.evtchn.waitSync(a.port, a.timeoutMs);
    return { ms: performance.now() - t };
  },
  /** waitSync in a worker thread: the event loop stays free (as in the daemons). */
  async evWaitWorker(a) {
    const r = await runWorker({ role: 'wait', evtchn: dom.evtchn.params(a.port), timeoutMs: a.timeoutMs });
    if (r.code !== 'ok') throw new VtpmError(r.code as VtpmErrorCode, 'wait in the worker failed');
    return {};
  },
  async evWaitAsync(a) {
    const t = performance.now();
    await dom.evtchn.wait(a.port, a.timeoutMs);
    return { ms: performance.now() - t };
  },
  evPoll(a) {
    return { pending: dom.evtchn.endpoint(a.port).poll() };
  },
  evClose(a) {
    dom.evtchn.close(a.port);
    return {};
  },
  /** The params of a port's end, as a worker would get them. */
  evParams(a) {
    return { params: dom.evtchn.params(a.port) };
  },
  /** Interrupt the end described by `params` from a fresh attachment (what TpmifBack.stopFrom does). */
  evInterrupt(a) {
    const ev = EvtchnEndpoint.attach(a.params);
    try {
      ev.interrupt();
    } finally {
      ev.detach();
    }
    return {};
  },
  /** n ping-pongs over `port`; the shared page (our own `page`, or mapping `map`) carries
   *  the sequence numbers so a lost or doubled wake-up is caught. */
  pingpong(a) {
    const buf = a.map ? maps.get(a.map)!.buf : dom.gnttab.pageBuffer(a.page);
    const w = new Int32Array(buf.buffer, buf.byteOffset, 2);
    const ep = dom.evtchn.endpoint(a.port);
    const t = performance.now();
    let errors = 0;
    if (a.first) {
      for (let i = 1; i <= a.n; i++) {
        Atomics.store(w, 0, i);
        ep.notify();
        ep.waitSync(10_000, a.spinUs ?? 0);
        if (Atomics.load(w, 1) !== i) errors++;
      }
    } else {
      for (let i = 1; i <= a.n; i++) {
        ep.waitSync(10_000, a.spinUs ?? 0);
        if (Atomics.load(w, 0) !== i) errors++;
        Atomics.store(w, 1, i);
        ep.notify();
      }
    }
    return { errors, ms: performance.now() - t };
  },
  async back(a) {
    back = await XenbusBack.start(dom, { frontId: a.frontId, uuid: a.uuid ?? '00000000-0000-4000-8000-000000000000' });
    back.onConnect((l) => {
      backWorker = worker({ role: 'back', params: l.params, spinUs: a.spinUs ?? 0 });
      backWorker.on('message', (m) => send({ ev: 'served', ...m }));
      send({ ev: 'backConnected' });
    });
    back.onDisconnect(() => send({ ev: 'backDisconnected' }));
    return {};
  },
  backStop() {
    TpmifBack.stopFrom(back!.link!.params);
    return {};
  },
  async backClose() {
    await back!.close();
    return { state: back!.state };
  },
  async front(a) {
    front = await XenbusFront.start(dom, { backendId: a.backendId });
    front.onDisconnect(() => send({ ev: 'frontDisconnected' }));
    await front.connected(a.timeoutMs ?? 20_000);
    return { state: front.state };
  },
  /** `n` xenbus front ends (devids 0..n-1) to one back end domain, all connected. */
  async manyFronts(a) {
    for (let i = 0; i < a.n; i++) fronts.push(await XenbusFront.start(dom, { backendId: a.backendId, devid: i, reconnect: false }));
    await Promise.all(fronts.map((f) => f.connected(a.timeoutMs ?? 60_000)));
    return { n: fronts.length };
  },
  async manyBatch(a) {
    return runWorker({ role: 'many', links: fronts.map((f) => f.link!.params), rounds: a.rounds });
  },
  async manyClose() {
    for (const f of fronts) await f.close();
    return {};
  },
  async frontConnected(a) {
    await front!.connected(a.timeoutMs ?? 20_000);
    return { state: front!.state };
  },
  async frontClose() {
    await front!.close();
    return { state: front!.state };
  },
  states() {
    return { front: front?.state, back: back?.state };
  },
  async frontBatch(a) {
    return runWorker({ role: 'front', params: front!.link!.params, n: a.n, seed: a.seed, maxSize: a.maxSize, reuse: a.reuse, spinUs: a.spinUs });
  },
  async bench(a) {
    return runWorker({ role: 'bench', params: front!.link!.params, n: a.n, size: a.size, spinUs: a.spinUs });
  },
  async sendAsync(a) {
    const rsp = await front!.link!.front.send(Buffer.from(a.data, 'hex'), 0, a.timeoutMs ?? 5000);
    return { data: Buffer.from(rsp).toString('hex') };
  },
  /** a slow command, a second submit while it runs, then cancel */
  async cancelTest() {
    const f = front!.link!.front;
    const slow = new Uint8Array(20).fill(0xcc);
    const p = f.send(slow, 0, 5000).then(
      () => 'finished',
      (e) => (isVtpmError(e) ? e.code : String(e)),
    );
    await new Promise((r) => setTimeout(r, 50));
    let second = 'accepted';
    try {
      await f.send(new Uint8Array(20), 0, 1000);
    } catch (e) {
      second = isVtpmError(e) ? e.code : String(e);
    }
    f.cancel();
    const first = await p;
    const after = await f.send(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), 0, 5000);
    return { first, second, after: Buffer.from(after).toString('hex') };
  },
  async oversize() {
    try {
      await front!.link!.front.send(new Uint8Array(4097), 0, 1000);
      return { code: 'none' };
    } catch (e) {
      return { code: isVtpmError(e) ? e.code : String(e) };
    }
  },
  async leave() {
    await dom.leave();
    return {};
  },
  exit() {
    setImmediate(() => process.exit(0));
    return {};
  },
};

process.on('message', async (m: any) => {
  try {
    const result = await ops[m.op]!(m.args ?? {});
    send({ id: m.id, ok: true, result });
  } catch (e) {
    send({ id: m.id, err: isVtpmError(e) ? e.code : 'EXC', msg: (e as Error).message });
  }
});
send({ ev: 'ready' });
