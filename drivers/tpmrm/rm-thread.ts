// A backend and its resource manager in their own worker thread, for a front end that serves
// on an event loop (fuse-native): tpm0's commands (TpmTransport.transmit) and tpmrm0's space
// requests go to the one thread that owns the backend, in order, so they never interleave
// — the resource manager's loads, the command and its saves run there synchronously.
//   const t = await RmThread.start(spec);  t.tpmrm  → whether the TPM is a 2.0 (a space is possible)
//   const s = await t.openSpace();  const r = await t.execute(s, cmd);  await t.closeSpace(s)
import type { Worker } from 'node:worker_threads';
import { errorFromWire, VtpmError, type WireError } from '../base/errors.ts';
import { codeFile, startWorker } from '../base/modules.ts';
import { DEFAULT_COMMAND_TIMEOUT_MS } from '../tpm/durations.ts';
import { checkTransportSpec, type TpmTransport, type TransportSpec } from '../tpm/transport.ts';

export type RmThreadRequest =
  | { op: 'transmit'; id: number; cmd: Uint8Array; locality: number }
  | { op: 'open'; id: number }
  | { op: 'execute'; id: number; space: number; cmd: Uint8Array; locality: number }
  | { op: 'release'; id: number; space: number }
  | { op: 'close'; id: 0 };
export type RmThreadReply =
  | { id: number; rsp: Uint8Array }
  | { id: number; errno: number }
  | { id: number; space: number }
  | { id: number; done: true }
  | { id: number; error: WireError }
  | { id: 0; ready: true; tpmrm: boolean };

type Answer = Exclude<RmThreadReply, { ready: true } | { error: WireError }>;

const ENTRY = codeFile('drivers/tpmrm/rm-thread-worker');

export class RmThread implements TpmTransport {
  private readonly pending = new Map<number, { resolve: (r: Answer) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private nextId = 1;
  private dead: VtpmError | null = null;

  private constructor(
    private readonly worker: Worker,
    /** The backend is a TPM 2.0 and spaces can be opened. */
    readonly tpmrm: boolean,
  ) {
    worker.on('message', (m: RmThreadReply) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if ('error' in m) p.reject(errorFromWire(m.error));
      else p.resolve(m as Answer);
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

  /** Start the backend; `tpmrm: false` skips the TPM 2.0 check (no spaces then). */
  static async start(spec: TransportSpec, o: { tpmrm?: boolean } = {}): Promise<RmThread> {
    checkTransportSpec(spec);
    const worker = startWorker(ENTRY, { workerData: { spec, tpmrm: o.tpmrm ?? true } });
    const tpmrm = await new Promise<boolean>((resolve, reject) => {
      const onMsg = (m: RmThreadReply) => {
        if (m.id !== 0) return;
        cleanup();
        if ('ready' in m) resolve(m.tpmrm);
        else if ('error' in m) {
          const e = errorFromWire(m.error);
          reject(new VtpmError(e.code, `backend did not start: ${e.message}`, { cause: e.cause }));
        }
      };
      const onExit = () => {
        cleanup();
        reject(new VtpmError('EIO', 'backend thread exited while starting'));
      };
      const cleanup = () => worker.off('message', onMsg).off('exit', onExit);
      worker.on('message', onMsg).once('exit', onExit);
    });
    return new RmThread(worker, tpmrm);
  }

  private ask(req: Exclude<RmThreadRequest, { op: 'close' }>): Promise<Answer> {
    if (this.dead) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(req.id);
        reject(new VtpmError('ETIMEDOUT', `backend gave no answer within ${DEFAULT_COMMAND_TIMEOUT_MS} ms`));
      }, DEFAULT_COMMAND_TIMEOUT_MS);
      this.pending.set(req.id, { resolve, reject, timer });
      this.worker.postMessage(req);
    });
  }

  /** A tpm0 command (no space). */
  async transmit(cmd: Uint8Array, locality = 0): Promise<Uint8Array> {
    const a = await this.ask({ op: 'transmit', id: this.nextId++, cmd, locality });
    if (!('rsp' in a)) throw new VtpmError('EPROTO', 'backend thread answered a command without a response');
    return a.rsp;
  }

  async openSpace(): Promise<number> {
    if (!this.tpmrm) throw new VtpmError('EINVAL', 'the backend is not a TPM 2.0: no spaces');
    const a = await this.ask({ op: 'open', id: this.nextId++ });
    if (!('space' in a)) throw new VtpmError('EPROTO', 'backend thread answered open without a space');
    return a.space;
  }

  /** A tpmrm0 command in `space`: the response, or the errno its write fails with. */
  async execute(space: number, cmd: Uint8Array, locality = 0): Promise<Uint8Array | number> {
    const a = await this.ask({ op: 'execute', id: this.nextId++, space, cmd, locality });
    if ('rsp' in a) return a.rsp;
    if ('errno' in a) return -a.errno;
    throw new VtpmError('EPROTO', 'backend thread answered a space command with neither response nor errno');
  }

  /** Flush what the space holds and forget it. */
  async closeSpace(space: number): Promise<void> {
    await this.ask({ op: 'release', id: this.nextId++, space });
  }

  async close(): Promise<void> {
    if (this.dead) return;
    const exited = new Promise<void>((r) => this.worker.once('exit', () => r()));
    this.worker.postMessage({ op: 'close', id: 0 } satisfies RmThreadRequest);
    const timer = setTimeout(() => void this.worker.terminate(), 5000);
    await exited;
    clearTimeout(timer);
  }
}
