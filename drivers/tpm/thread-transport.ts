// A SyncTransport run in its own worker thread, seen from an event loop as a TpmTransport:
// how the fuse-native front end (which serves on the main thread) uses the same backend
// specs as the raw front end, without ever running a TPM command on the main thread.
import type { Worker } from 'node:worker_threads';
import { errorFromWire, VtpmError, type WireError } from '../base/errors.ts';
import { DEFAULT_COMMAND_TIMEOUT_MS } from './durations.ts';
import type { TpmTransport } from './transport.ts';
import { sibling, startWorker } from '../base/modules.ts';
import { checkTransportSpec, type TransportSpec } from './transport.ts';

export type ThreadTransportRequest = { id: number; cmd: Uint8Array; locality: number } | { id: 0; close: true };
export type ThreadTransportReply =
  | { id: number; rsp: Uint8Array }
  | { id: number; error: WireError }
  | { id: 0; ready: true };

const ENTRY = sibling(import.meta.url, './thread-transport-worker');

export interface ThreadTransportOptions {
  /** A command taking longer fails with ETIMEDOUT (the client gets EIO); default the
   *  command core's bound. */
  timeoutMs?: number;
}

export class ThreadTransport implements TpmTransport {
  private readonly pending = new Map<number, { resolve: (r: Uint8Array) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private nextId = 1;
  private dead: VtpmError | null = null;

  private constructor(
    private readonly worker: Worker,
    private readonly timeoutMs: number,
  ) {
    worker.on('message', (m: ThreadTransportReply) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if ('rsp' in m) p.resolve(m.rsp);
      else if ('error' in m) p.reject(errorFromWire(m.error));
    });
    const gone = (e?: unknown) => {
      this.dead = new VtpmError('ECLOSED', 'backend thread exited', { cause: e });
      for (const p of this.pending.values()) {
        clearTimeout(p.timer);
        p.reject(this.dead);
      }
      this.pending.clear();
    };
    worker.once('error', gone);
    worker.once('exit', () => gone());
  }

  static async start(spec: TransportSpec, o: ThreadTransportOptions = {}): Promise<ThreadTransport> {
    checkTransportSpec(spec);
    const worker = startWorker(ENTRY, { workerData: spec });
    await new Promise<void>((resolve, reject) => {
      const onMsg = (m: ThreadTransportReply) => {
        if (m.id !== 0) return;
        cleanup();
        if ('ready' in m) resolve();
        else if ('error' in m) {
          // The worker's code and causes survive; the message says where it failed.
          const e = errorFromWire(m.error);
          reject(new VtpmError(e.code, `backend did not start: ${e.message}`, { cause: e.cause }));
        }
      };
      const onExit = () => {
        cleanup();
        reject(new VtpmError('EIO', 'backend thread exited while starting'));
      };
      const onErr = (e: Error) => {
        cleanup();
        reject(new VtpmError('EIO', 'backend thread failed while starting', { cause: e }));
      };
      const cleanup = () => worker.off('message', onMsg).off('exit', onExit).off('error', onErr);
      worker.on('message', onMsg).once('exit', onExit).once('error', onErr);
    });
    return new ThreadTransport(worker, o.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS);
  }

  transmit(command: Uint8Array, locality = 0): Promise<Uint8Array> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new VtpmError('ETIMEDOUT', `backend gave no response within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.worker.postMessage({ id, cmd: command, locality } satisfies ThreadTransportRequest);
    });
  }

  async close(): Promise<void> {
    if (this.dead) return;
    const exited = new Promise<void>((r) => this.worker.once('exit', () => r()));
    this.worker.postMessage({ id: 0, close: true } satisfies ThreadTransportRequest);
    const timer = setTimeout(() => void this.worker.terminate(), 5000);
    await exited;
    clearTimeout(timer);
  }
}
