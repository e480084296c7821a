// Raw FUSE front end (the default): mount(2) through koffi as root with a /dev/fuse fd,
// then a worker thread owns that fd and speaks the FUSE protocol itself (fuse-serve.ts),
// running each command through its backend with no hop to this thread.
import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { codeFile, startWorker } from '../base/modules.ts';
import { VtpmError } from '../base/errors.ts';
import { checkTransportSpec, type TransportSpec } from '../tpm/transport.ts';
import { NODE_NAME, RM_NODE_NAME } from './fuse-serve.ts';
import type { RawWorkerData, RawWorkerMessage } from './fuse-raw-worker.ts';
import { detach, prepareMountpoint, trackMount, untrackMount } from './mountpoint.ts';
import { MS_NODEV, MS_NOSUID, O_CLOEXEC, O_NONBLOCK, O_RDWR, sysClose, sysMount, sysOpen } from '../base/libc.ts';

export interface RawMountOptions {
  dir: string;
  backend: TransportSpec;
  graceMs?: number;
  responseTimeoutMs?: number;
  maxWrite?: number;
  /** Unmount on SIGTERM/SIGINT and exit (default true). */
  handleSignals?: boolean;
  /** How long to wait for the worker's backend and INIT (ms). */
  startTimeoutMs?: number;
  /** Serve tpmrm0 beside tpm0 when the backend is a TPM 2.0 (default true). */
  tpmrm?: boolean;
}

export interface TpmNode {
  /** Path of tpm0. */
  readonly path: string;
  /** Path of tpmrm0 (TPM 2.0 backends only; undefined when the node has none). */
  readonly rmPath?: string;
  readonly dir: string;
  readonly frontEnd: 'raw' | 'native';
  /** Resolves when the node stops serving by itself (backend failed to start, unmounted). */
  readonly ended: Promise<void>;
  /** Stop serving (clients holding tpm0 get ENOTCONN) and unmount. Idempotent. */
  close(): Promise<void>;
}

const WORKER = codeFile('drivers/tpmfront/fuse-raw-worker');

export async function mountRaw(o: RawMountOptions): Promise<TpmNode> {
  checkTransportSpec(o.backend);
  if (process.getuid?.() !== 0) throw new VtpmError('EPERM', 'the raw FUSE front end mounts with mount(2) and needs root');
  const fd = mountFuse(o.dir);
  const stop = new SharedArrayBuffer(4);
  const data: RawWorkerData = {
    fd,
    backend: o.backend,
    stop,
    maxWrite: o.maxWrite,
    graceMs: o.graceMs,
    responseTimeoutMs: o.responseTimeoutMs,
    uid: 0,
    gid: 0,
    tpmrm: o.tpmrm,
  };
  const worker = startWorker(WORKER, { workerData: data });
  let exited = false;
  let failure: VtpmError | null = null;
  const ended = new Promise<void>((resolve) => {
    worker.once('exit', () => {
      exited = true;
      resolve();
    });
  });
  worker.on('message', (m: RawWorkerMessage) => {
    if (m.type === 'error') failure = new VtpmError('EIO', `tpm0 FUSE worker: ${m.message}`);
  });
  worker.on('error', (e) => {
    failure = new VtpmError('EIO', 'tpm0 FUSE worker crashed', { cause: e });
  });

  let closing: Promise<void> | null = null;
  const close = (): Promise<void> =>
    (closing ??= (async () => {
      Atomics.store(new Int32Array(stop), 0, 1);
      if (!exited) {
        // The worker blocks in read(2): a STATFS wakes it to see the stop flag.
        statfs(o.dir).catch(() => undefined);
        await waitExit(worker, ended, 2000);
      }
      detach(o.dir);
      untrackMount(o.dir);
    })());

  let tpmrm = false;
  try {
    tpmrm = await waitInit(worker, o.startTimeoutMs ?? 15_000);
  } catch (e) {
    await close();
    throw new VtpmError('EIO', `tpm0 at ${o.dir} did not start`, { cause: failure ?? e });
  }
  trackMount(o.dir, close, o.handleSignals ?? true);
  return { path: join(o.dir, NODE_NAME), rmPath: tpmrm ? join(o.dir, RM_NODE_NAME) : undefined, dir: o.dir, frontEnd: 'raw', ended, close };
}

/** Mount a FUSE file system of ours on `dir` (prepared first: created 0700, a stale mount
 *  cleared) and return its /dev/fuse descriptor. `nonBlocking` for a thread that waits on
 *  many mounts in epoll; `source` is what /proc/mounts names as the device (who mounted it). */
export function mountFuse(dir: string, o: { nonBlocking?: boolean; source?: string } = {}): number {
  prepareMountpoint(dir);
  const fd = sysOpen('/dev/fuse', O_RDWR | O_CLOEXEC | (o.nonBlocking ? O_NONBLOCK : 0));
  try {
    // nosuid,nodev; default_permissions makes the kernel enforce the node's 0600.
    sysMount(o.source ?? 'vtpm', dir, 'fuse.vtpm', MS_NOSUID | MS_NODEV, `fd=${fd},rootmode=40000,user_id=0,group_id=0,default_permissions`);
  } catch (e) {
    sysClose(fd);
    throw e;
  }
  return fd;
}

/** Resolves once INIT is answered, with whether the node has tpmrm0. */
function waitInit(worker: Worker, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve, reject) => {
    let tpmrm = false;
    const timer = setTimeout(() => done(new VtpmError('ETIMEDOUT', `no FUSE INIT within ${timeoutMs} ms`)), timeoutMs);
    const onMsg = (m: RawWorkerMessage) => {
      if (m.type === 'init') {
        tpmrm = m.tpmrm;
        done();
      }
      else if (m.type === 'error') done(new VtpmError('EIO', m.message));
    };
    const onExit = () => done(new VtpmError('EIO', 'FUSE worker exited before INIT'));
    const done = (e?: Error) => {
      clearTimeout(timer);
      worker.off('message', onMsg).off('exit', onExit);
      if (e) reject(e);
      else resolve(tpmrm);
    };
    worker.on('message', onMsg).once('exit', onExit);
  });
}

async function waitExit(worker: Worker, ended: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  const ok = await Promise.race([ended.then(() => true), timeout]);
  clearTimeout(timer);
  if (ok) return;
  // Still blocked (a backend call): JS termination happens when it returns; don't wait forever.
  await Promise.race([worker.terminate(), new Promise((r) => setTimeout(r, 1000).unref())]);
}
