// A fixed pool of raw FUSE threads serving many guests' nodes from one process (the
// per-host front end, frontd.ts): every node is its own FUSE mount with its own /dev/fuse
// descriptor, mounted here and handed to the least-loaded thread, which waits on all its
// mounts in one epoll (fuse-multi.ts, fuse-pool-worker.ts). Threads start as mounts need
// them, up to `threads`. Each node keeps tpm-dev semantics exactly (its own core, parked
// OPENs, tpmrm0 spaces); nodes on one thread serialize their TPM waits like commands on one
// chip, which is why there is more than one thread.
//   const pool = new FusePool({ threads: 2 })
//   const node = await pool.mount({ dir, backend: tpmifBackendSpec(params), label: 'guest-a' })
//   await node.close(); await pool.close()
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { MessageChannel, type MessagePort, type Worker } from 'node:worker_threads';
import { VtpmError } from '../base/errors.ts';
import { EventFd } from '../base/libc-poll.ts';
import { sysClose } from '../base/libc.ts';
import { codeFile, startWorker } from '../base/modules.ts';
import { checkTransportSpec, type TransportSpec } from '../tpm/transport.ts';
import { mountFuse, type TpmNode } from './fuse-raw.ts';
import { DEFAULT_MAX_WRITE, NODE_NAME, RM_NODE_NAME } from './fuse-serve.ts';
import type { PoolEvent, PoolRequest, PoolWorkerData } from './fuse-pool-worker.ts';
import { detach, trackMount, untrackMount } from './mountpoint.ts';

const WORKER = codeFile('drivers/tpmfront/fuse-pool-worker');
/** Two threads (or one on a single CPU): a guest whose TPM is slow to answer stalls only the
 *  guests on its thread; more are a `threads` option away. */
export const DEFAULT_THREADS = Math.max(1, Math.min(2, availableParallelism()));

export interface FusePoolOptions {
  threads?: number;
  /** /proc/mounts' device name for this pool's mounts (default 'vtpm'). */
  source?: string;
}

export interface PoolMountOptions {
  dir: string;
  backend: TransportSpec;
  /** Who the node serves, in log lines ('guest-NAME'). */
  label: string;
  graceMs?: number;
  responseTimeoutMs?: number;
  tpmrm?: boolean;
  /** How long to wait for the backend and the kernel's INIT (ms, default 15 000). */
  startTimeoutMs?: number;
}

/** A node served by the pool, with the thread serving it (nodes of one thread wait for
 *  each other's TPM). */
export interface PoolNode extends TpmNode {
  readonly thread: number;
}

interface Thread {
  /** A number for logs and listings: 0, 1, ... in start order. */
  n: number;
  worker: Worker;
  port: MessagePort;
  wake: EventFd;
  mounts: Set<number>;
  exited: boolean;
}

interface Pending {
  thread: Thread;
  fd: number;
  init: (tpmrm: boolean) => void;
  end: (how: string, why?: string) => void;
}

export class FusePool {
  readonly threads: number;
  private readonly source: string;
  private readonly pool: Thread[] = [];
  private readonly mounts = new Map<number, Pending>();
  private nextId = 1;
  private started = 0;
  private closing = false;

  constructor(o: FusePoolOptions = {}) {
    const n = o.threads ?? DEFAULT_THREADS;
    if (!Number.isInteger(n) || n < 1 || n > 256) throw new VtpmError('EINVAL', `a FUSE pool needs 1..256 threads, not ${n}`);
    this.threads = n;
    this.source = o.source ?? 'vtpm';
  }

  /** Mounts per thread (started threads only). */
  get load(): number[] {
    return this.pool.map((t) => t.mounts.size);
  }

  /** Mount `dir` and serve tpm0 (and tpmrm0 for a TPM 2.0) from the least-loaded thread;
   *  resolves once the kernel's INIT is answered. */
  async mount(o: PoolMountOptions): Promise<PoolNode> {
    if (this.closing) throw new VtpmError('ECLOSED', 'the FUSE pool is closing');
    checkTransportSpec(o.backend);
    const thread = this.pick();
    const fd = mountFuse(o.dir, { nonBlocking: true, source: this.source });
    const id = this.nextId++;
    let tpmrm = false;
    let resolveInit!: () => void;
    let failInit!: (e: VtpmError) => void;
    const inited = new Promise<void>((res, rej) => ((resolveInit = res), (failInit = rej)));
    let resolveEnded!: () => void;
    const ended = new Promise<void>((r) => (resolveEnded = r));
    let endWhy = '';
    this.mounts.set(id, {
      thread,
      fd,
      init: (rm) => {
        tpmrm = rm;
        resolveInit();
      },
      end: (how, why) => {
        endWhy = `${how}${why ? `: ${why}` : ''}`;
        this.mounts.delete(id);
        thread.mounts.delete(id);
        failInit(new VtpmError('EIO', `the node at ${o.dir} stopped serving (${endWhy})`));
        resolveEnded();
      },
    });
    thread.mounts.add(id);
    this.send(thread, { op: 'add', id, fd, backend: o.backend, label: o.label, graceMs: o.graceMs, responseTimeoutMs: o.responseTimeoutMs, tpmrm: o.tpmrm });

    let closingNode: Promise<void> | null = null;
    const close = (): Promise<void> =>
      (closingNode ??= (async () => {
        if (this.mounts.has(id) && !thread.exited) {
          this.send(thread, { op: 'remove', id });
          // A thread waiting for a TPM that does not answer is stuck until the backend's own
          // timeout; the mount goes away regardless (its fd is closed when the thread returns).
          await Promise.race([ended, new Promise((r) => setTimeout(r, 5000).unref())]);
        }
        detach(o.dir);
        untrackMount(o.dir);
      })());

    const timeoutMs = o.startTimeoutMs ?? 15_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([inited, new Promise<never>((_, rej) => (timer = setTimeout(() => rej(new VtpmError('ETIMEDOUT', `no FUSE INIT within ${timeoutMs} ms`)), timeoutMs)))]);
    } catch (e) {
      await close();
      throw new VtpmError('EIO', `tpm0 at ${o.dir} did not start`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
    trackMount(o.dir, close, false);
    return { path: join(o.dir, NODE_NAME), rmPath: tpmrm ? join(o.dir, RM_NODE_NAME) : undefined, dir: o.dir, frontEnd: 'raw', ended, close, thread: thread.n };
  }

  /** Unmount every node and stop the threads. */
  async close(): Promise<void> {
    this.closing = true;
    for (const t of this.pool) if (!t.exited) this.send(t, { op: 'stop' });
    await Promise.all(this.pool.map((t) => (t.exited ? undefined : new Promise((r) => t.worker.once('exit', r)))));
  }

  /** The least-loaded thread; a new one while fewer than `threads` run and all are busy. */
  private pick(): Thread {
    const live = this.pool.filter((t) => !t.exited);
    let best = live[0];
    for (const t of live) if (t.mounts.size < best!.mounts.size) best = t;
    if (best && (best.mounts.size === 0 || live.length >= this.threads)) return best;
    return this.start();
  }

  private start(): Thread {
    const wake = new EventFd();
    const { port1, port2 } = new MessageChannel();
    const data: PoolWorkerData = { port: port2, wakeFd: wake.fd, maxWrite: DEFAULT_MAX_WRITE };
    const worker = startWorker(WORKER, { workerData: data, transferList: [port2] });
    const t: Thread = { n: this.started++, worker, port: port1, wake, mounts: new Set(), exited: false };
    worker.on('message', (e: PoolEvent) => {
      const m = this.mounts.get(e.id);
      if (!m) return;
      if (e.type === 'init') m.init(e.tpmrm);
      else m.end(e.how, e.why);
    });
    let crash = '';
    worker.on('error', (e) => (crash = e.message));
    worker.once('exit', (code) => {
      t.exited = true;
      wake.close();
      port1.close();
      // The nodes this thread served stop: their fds belong to the process, so close them
      // here (the kernel aborts those connections: clients get ENOTCONN, not a hang).
      for (const id of [...t.mounts]) {
        const m = this.mounts.get(id);
        if (!m) continue;
        sysClose(m.fd);
        m.end('failed', crash ? `its FUSE thread crashed: ${crash}` : `its FUSE thread exited (${code})`);
      }
      this.pool.splice(this.pool.indexOf(t), 1);
    });
    this.pool.push(t);
    return t;
  }

  private send(t: Thread, r: PoolRequest): void {
    t.port.postMessage(r);
    t.wake.signal();
  }
}
