// The main thread's handle on the host's one state thread (state-worker.ts): a run hands it
// its state link and gets the committed versions as they come and when the link ends.
// One thread per manager domain: when the authority is replaced the manager joins anew (a
// new domain, a new thread); the old thread goes on serving the old domain's links (their
// vtpmds' last stores: an orderly shutdown) and ends once the last of them has ended, when
// the manager closes its control channel (no authority is left to close it).
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { VtpmError } from '../drivers/base/errors.ts';
import { codeFile, startWorker } from '../drivers/base/modules.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { StateThreadData, StateThreadRequest, StateWorkerData, StateWorkerEvent } from './state-worker.ts';

export interface StateLink {
  /** Stop serving this link (vtpmd is gone or stopping); `ended` then resolves. */
  stop(): void;
  /** The versions the link last committed, once it has ended. */
  readonly ended: Promise<Record<string, number>>;
}

interface Waiter {
  onVersions: (v: Record<string, number>) => void;
  onEnded: (why: string, v: Record<string, number>) => void;
}

export class StateThread {
  private readonly waiters = new Map<number, Waiter>();
  private nextId = 1;
  private exited = false;
  /** Its domain's authority is gone: no new links; it ends with its last link. */
  private lost = false;
  private readonly exit: Promise<void>;

  private constructor(
    worker: Worker,
    private readonly port: MessagePort,
    private readonly kick: () => void,
    log: (line: string) => void,
    gone: () => void,
    domain: Domain,
    private readonly closeControl: () => void,
  ) {
    domain.onLost(() => {
      this.lost = true;
      this.endIfDone();
    });
    port.on('message', (m: StateWorkerEvent) => {
      const w = this.waiters.get(m.id);
      if (!w) return;
      if (m.ev === 'versions') w.onVersions(m.versions);
      else {
        this.waiters.delete(m.id);
        w.onEnded(m.why, m.versions);
        this.endIfDone();
      }
    });
    port.unref();
    worker.once('error', (e) => log(`the state thread crashed: ${e.message}`));
    let exited!: () => void;
    this.exit = new Promise((r) => (exited = r));
    worker.once('exit', () => {
      exited();
      this.exited = true;
      gone(); // the next run starts a new one
      for (const [id, w] of this.waiters) {
        this.waiters.delete(id);
        w.onEnded('the state thread ended', {});
      }
    });
    worker.unref();
  }

  private static threads = new WeakMap<Domain, Promise<StateThread>>();

  /** The state thread of `domain` (started on first use). */
  static for(domain: Domain, log: (line: string) => void): Promise<StateThread> {
    let t = StateThread.threads.get(domain);
    if (!t) {
      t = StateThread.start(domain, log);
      StateThread.threads.set(domain, t);
      t.catch(() => StateThread.threads.delete(domain));
    }
    return t;
  }

  private static async start(domain: Domain, log: (line: string) => void): Promise<StateThread> {
    // The control channel: a loopback pair of the manager's own domain.
    const theirs = domain.evtchn.allocUnbound(domain.domid);
    const ours = await domain.evtchn.bindInterdomain(domain.domid, theirs);
    const ch = new MessageChannel();
    const data: StateThreadData = { control: domain.evtchn.params(theirs), port: ch.port2 };
    const worker = startWorker(codeFile('manager/state-worker'), { workerData: data, transferList: [ch.port2] });
    return new StateThread(worker, ch.port1, () => domain.evtchn.notify(ours), log, () => StateThread.threads.delete(domain), domain, () => domain.evtchn.close(ours));
  }

  /** End `domain`'s state thread, if it has one, and wait until it has: before the domain
   *  leaves (once the authority has reaped it, the thread could no longer map its files). */
  static async stop(domain: Domain): Promise<void> {
    const t = await StateThread.threads.get(domain)?.catch(() => undefined);
    if (!t || t.exited) return;
    try {
      t.closeControl();
    } catch {
      // closed already
    }
    await t.exit;
  }

  private endIfDone(): void {
    if (this.lost && this.waiters.size === 0 && !this.exited) {
      try {
        this.closeControl();
      } catch {
        // closed already
      }
    }
  }

  /** Serve `link` until it ends; versions as each store commits. */
  serve(link: StateWorkerData, onVersions: (v: Record<string, number>) => void, onEnded: (why: string) => void): StateLink {
    if (this.exited || this.lost) throw new VtpmError('ECLOSED', this.exited ? 'the state thread has ended' : "the state thread's authority is gone");
    const id = this.nextId++;
    let resolve!: (v: Record<string, number>) => void;
    const ended = new Promise<Record<string, number>>((r) => (resolve = r));
    let last = link.minVersions;
    this.waiters.set(id, {
      onVersions: (v) => {
        last = v;
        onVersions(v);
      },
      onEnded: (why, v) => {
        if (Object.keys(v).length) last = v;
        onEnded(why);
        resolve(last);
      },
    });
    this.request({ op: 'add', id, link });
    return { stop: () => this.request({ op: 'remove', id }), ended };
  }

  private request(r: StateThreadRequest): void {
    if (this.exited) return;
    this.port.postMessage(r);
    this.kick();
  }
}
