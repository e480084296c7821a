// The grouped vtpmd's engine threads, as its main thread sees them (the threads:
// group-worker.ts). Each thread has a control channel: a loopback event-channel pair in the
// group's own domain, one side routed to the thread's mux, the other notified from here
// after each request is posted. A new engine goes to the thread hosting the fewest.
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { errorFromWire, VtpmError } from '../drivers/base/errors.ts';
import { codeFile, startWorker } from '../drivers/base/modules.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { EvtchnParams } from '../drivers/xen/evtchn.ts';
import { EvtchnMux } from '../drivers/xen/evtchn-mux.ts';
import type { GroupWorkerData, GroupWorkerEvent, GroupWorkerRequest } from './group-worker.ts';

/** Distributive Omit: a request without its id, for each op. */
type Request = GroupWorkerRequest extends infer R ? (R extends unknown ? Omit<R, 'id'> : never) : never;

export class EngineThread {
  /** Engines placed on this thread (counted from placement, before their boot ends). */
  load = 0;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (bytes: number | undefined) => void; reject: (e: Error) => void }>();
  private dead: VtpmError | null = null;

  private constructor(
    readonly index: number,
    private readonly worker: Worker,
    private readonly port: MessagePort,
    private readonly dom: Domain,
    private readonly bell: number,
    private readonly control: EvtchnParams,
  ) {}

  /** Start thread `index`; resolves once its mux waits. `onClosed(name)`: a guest channel
   *  of one of its engines ended. `onDied(e)`: the thread crashed (its engines with it). */
  static async start(dom: Domain, index: number, o: { onClosed: (name: string) => void; onDied: (e: Error) => void }): Promise<EngineThread> {
    const offered = dom.evtchn.allocUnbound(dom.domid);
    const bell = await dom.evtchn.bindInterdomain(dom.domid, offered);
    const { port1, port2 } = new MessageChannel();
    const wd: GroupWorkerData = { index, control: dom.evtchn.params(offered), port: port2 };
    const worker = startWorker(codeFile('vtpmd/group-worker'), { workerData: wd, transferList: [port2] });
    const t = new EngineThread(index, worker, port1, dom, bell, wd.control);
    await new Promise<void>((resolve, reject) => {
      worker.on('message', (e: GroupWorkerEvent) => {
        if (e.ev === 'up') resolve();
        else if (e.ev === 'closed') o.onClosed(e.name);
        else t.settle(e);
      });
      worker.once('error', (e) => {
        t.fail(new VtpmError('EENGINE', `engine thread ${index} crashed`, { cause: e }));
        reject(t.dead);
        o.onDied(t.dead!);
      });
      worker.once('exit', (code) => {
        t.fail(new VtpmError('EENGINE', `engine thread ${index} exited (code ${code})`));
        reject(t.dead);
      });
    });
    return t;
  }

  private settle(e: Extract<GroupWorkerEvent, { ev: 'reply' }>): void {
    const p = this.pending.get(e.id);
    if (!p) return;
    this.pending.delete(e.id);
    if (e.ok) p.resolve(e.bytes);
    else p.reject(errorFromWire(e.error));
  }

  private fail(e: VtpmError): void {
    this.dead ??= e;
    for (const p of this.pending.values()) p.reject(this.dead);
    this.pending.clear();
  }

  /** One request; resolves with the reply's `bytes` (suspend) once the thread ran it. */
  request(req: Request): Promise<number | undefined> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.port.postMessage({ ...req, id });
      this.dom.evtchn.notify(this.bell);
    });
  }

  /** Make the thread end at once, engines and all (from its mux wait, between commands):
   *  the process is going down hard, and a thread blocked in its futex wait would keep
   *  process.exit() waiting for it. */
  interrupt(): void {
    if (!this.dead) EvtchnMux.interruptFrom(this.control);
  }

  async aborted(): Promise<void> {
    if (this.dead) return;
    const ended = new Promise<void>((r) => this.worker.once('exit', () => r()));
    this.interrupt();
    await ended;
  }

  /** Every engine stopped orderly, then the thread ends. */
  async exit(): Promise<void> {
    if (this.dead) return;
    const ended = new Promise<void>((r) => this.worker.once('exit', () => r()));
    await this.request({ op: 'exit' });
    await ended;
  }
}

export class EnginePool {
  private constructor(readonly threads: EngineThread[]) {}

  static async start(dom: Domain, size: number, o: { onClosed: (name: string) => void; onDied: (e: Error) => void }): Promise<EnginePool> {
    const threads = await Promise.all(Array.from({ length: size }, (_, i) => EngineThread.start(dom, i, o)));
    return new EnginePool(threads);
  }

  /** The thread hosting the fewest engines (the lowest index among equals); counted at once. */
  place(): EngineThread {
    const t = this.threads.reduce((a, b) => (b.load < a.load ? b : a));
    t.load++;
    return t;
  }

  release(t: EngineThread): void {
    t.load--;
  }

  /** The threads ended at once (see EngineThread.interrupt); resolves when they have. */
  async abort(): Promise<void> {
    await Promise.all(this.threads.map((t) => t.aborted()));
  }

  async exit(): Promise<void> {
    await Promise.all(this.threads.map((t) => t.exit()));
  }
}
