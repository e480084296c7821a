// Worker entry of the shared FUSE pool (fuse-pool.ts): serves every mount handed to this
// thread from one epoll (fuse-multi.ts). Work arrives on a MessagePort that the thread
// reads synchronously (receiveMessageOnPort) when the pool signals its eventfd: add a mount
// (its /dev/fuse fd, opened non-blocking and mounted by the pool, and its backend's spec,
// built here because a futex-waiting tpmif front cannot cross threads), remove one, stop.
// A mount's failure (its backend cannot be built, its fd fails) ends that mount only.
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { describeError } from '../base/errors.ts';
import { EventFd } from '../base/libc-poll.ts';
import { sysClose } from '../base/libc.ts';
import { dropStartupGarbage } from '../base/modules.ts';
import { loadTransport, type SyncTransport, type TransportSpec } from '../tpm/transport.ts';
import { ResourceManager } from '../tpmrm/resource-manager.ts';
import { backendErrorReporter } from './backend-error.ts';
import { FuseServer, ServeBuffers } from './fuse-serve.ts';
import { MultiServer, type MultiEnd, type ServedMount } from './fuse-multi.ts';
import { TpmDevCore } from './tpmdev.ts';

export interface PoolWorkerData {
  port: MessagePort;
  /** The pool's eventfd for this thread: signalled after each message. */
  wakeFd: number;
  maxWrite: number;
}

export interface PoolMountSpec {
  id: number;
  fd: number;
  backend: TransportSpec;
  /** Who the mount is for, in this thread's log lines. */
  label: string;
  graceMs?: number;
  responseTimeoutMs?: number;
  /** Serve tpmrm0 when the backend is a TPM 2.0 (default true). */
  tpmrm?: boolean;
}

export type PoolRequest = ({ op: 'add' } & PoolMountSpec) | { op: 'remove'; id: number } | { op: 'stop' };

export type PoolEvent =
  | { type: 'init'; id: number; tpmrm: boolean }
  | { type: 'end'; id: number; how: MultiEnd | 'removed' | 'failed'; why?: string };

const d = workerData as PoolWorkerData;
const post = (e: PoolEvent) => parentPort!.postMessage(e);
const buffers = new ServeBuffers(d.maxWrite);
const loop = new MultiServer(new EventFd(d.wakeFd));
const backends = new Map<number, SyncTransport>();

/** Close a mount's fd (clients still holding its nodes get ENOTCONN) and its backend. */
function release(id: number, fd: number): string | undefined {
  sysClose(fd);
  const b = backends.get(id);
  backends.delete(id);
  try {
    b?.close();
  } catch (e) {
    return `backend close: ${describeError(e)}`;
  }
  return undefined;
}

function ended(m: ServedMount, how: MultiEnd, why?: string): void {
  const more = release(m.id, m.fd);
  post({ type: 'end', id: m.id, how, ...(why || more ? { why: [why, more].filter(Boolean).join('; ') } : {}) });
}

async function add(s: PoolMountSpec): Promise<void> {
  let backend: SyncTransport;
  try {
    backend = await loadTransport(s.backend);
  } catch (e) {
    sysClose(s.fd);
    post({ type: 'end', id: s.id, how: 'failed', why: describeError(e) });
    return;
  }
  backends.set(s.id, backend);
  try {
    const rm = s.tpmrm === false ? null : ResourceManager.detect(backend);
    const report = backendErrorReporter((line) => console.error(`${new Date().toISOString()} ${s.label}: ${line}`));
    const server = new FuseServer({
      fd: s.fd,
      backend,
      rm,
      buffers,
      maxWrite: d.maxWrite,
      core: new TpmDevCore({ graceMs: s.graceMs, responseTimeoutMs: s.responseTimeoutMs }),
      onBackendError: report,
      onInit: () => post({ type: 'init', id: s.id, tpmrm: rm !== null }),
    });
    loop.add({ id: s.id, fd: s.fd, server });
  } catch (e) {
    const more = release(s.id, s.fd);
    post({ type: 'end', id: s.id, how: 'failed', why: [describeError(e), more].filter(Boolean).join('; ') });
  }
}

function remove(id: number): void {
  const m = loop.remove(id);
  if (!m) return; // ended by itself already (its end was posted)
  const why = release(m.id, m.fd);
  post({ type: 'end', id, how: 'removed', ...(why ? { why } : {}) });
}

let stopping = false;
let first = true;
while (!stopping) {
  loop.serve(ended);
  for (let m = receiveMessageOnPort(d.port); m; m = receiveMessageOnPort(d.port)) {
    const r = m.message as PoolRequest;
    if (r.op === 'add') await add(r);
    else if (r.op === 'remove') remove(r.id);
    else stopping = true;
  }
  if (first) {
    first = false;
    dropStartupGarbage(); // once this thread's modules are loaded
  }
}
for (const id of loop.ids()) remove(id);
loop.close();
d.port.close();
