// Test fixture: the manager's end of the grouped vtpmd's state links, in this test process
// (a 'manager' domain whose xenbus back ends wait for each member's domain, and one worker
// thread serving every link's requests from plain blob files per instance: DIR/state/UUID).
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { join } from 'node:path';
import { startWorker } from '../../drivers/base/modules.ts';
import { XenbusBack } from '../../drivers/tpmback/xenbus-back.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import type { EvtchnParams } from '../../drivers/xen/evtchn.ts';
import { EvtchnMux } from '../../drivers/xen/evtchn-mux.ts';
import type { StateServerRequest, StateServerWorkerData } from './state-server-worker.ts';

export class StateServer {
  private readonly backs = new Set<XenbusBack>();
  private exited = false;
  private constructor(
    readonly dom: Domain,
    private readonly worker: Worker,
    private readonly port: MessagePort,
    private readonly bell: number,
    private readonly control: EvtchnParams,
    readonly dir: string,
  ) {}

  static async start(authDir: string, dir: string): Promise<StateServer> {
    const dom = await Domain.join(authDir, { name: 'test-manager' });
    const offered = dom.evtchn.allocUnbound(dom.domid);
    const bell = await dom.evtchn.bindInterdomain(dom.domid, offered);
    const { port1, port2 } = new MessageChannel();
    const wd: StateServerWorkerData = { control: dom.evtchn.params(offered), port: port2, log: join(dir, 'state-server.log') };
    const worker = startWorker(join(import.meta.dirname, 'state-server-worker.ts'), { workerData: wd, transferList: [port2] });
    await new Promise<void>((resolve, reject) => {
      worker.once('message', () => resolve());
      worker.once('error', reject);
    });
    const server = new StateServer(dom, worker, port1, bell, wd.control, dir);
    worker.once('exit', () => (server.exited = true));
    return server;
  }

  get domid(): number {
    return this.dom.domid;
  }

  /** Where instance `uuid`'s blobs are kept. */
  stateDir(uuid: string): string {
    return join(this.dir, 'state', uuid);
  }

  private send(m: StateServerRequest): void {
    this.port.postMessage(m);
    this.dom.evtchn.notify(this.bell);
  }

  /** A back end for member domain `domid`'s state link (as the manager opens one). */
  async open(domid: number, uuid: string): Promise<XenbusBack> {
    const back = await XenbusBack.start(this.dom, { frontId: domid, uuid });
    this.backs.add(back);
    back.onConnect((l) => this.send({ op: 'serve', params: l.params, uuid, dir: this.stateDir(uuid) }));
    return back;
  }

  /** From now on every store of instance `uuid` fails (its manager's disk is gone). */
  failStores(uuid: string): void {
    this.send({ op: 'fail', uuid });
  }

  async stop(): Promise<void> {
    for (const b of this.backs) await b.close(1000).catch(() => {});
    // the worker sleeps in its mux: interrupt it, then it ends by itself
    if (this.exited) return void (await this.dom.leave());
    const ended = new Promise((r) => this.worker.once('exit', r));
    EvtchnMux.interruptFrom(this.control);
    await ended;
    await this.dom.leave();
  }
}
