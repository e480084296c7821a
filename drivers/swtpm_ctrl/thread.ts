// Start the control-channel server on its own worker thread and stop it again.
//   const w = await startCtrlWorker({ version: '2.0', ctrlPath, stateDir })
//   ...; await w.stop()          // or: const why = await w.ended  (SHUTDOWN from the client)
import { codeFile, startWorker } from '../base/modules.ts';
import { errorFromWire, VtpmError } from '../base/errors.ts';
import { sysClose, sysWrite } from '../base/libc.ts';
import { sysPipe } from '../base/libc-sockets.ts';
import type { ServeEnd } from './server.ts';
import type { CtrlWorkerData, CtrlWorkerEvent } from './worker.ts';

export interface CtrlWorker {
  /** Resolves when serving ends (SHUTDOWN, stop(), hang-up); the thread then exits. */
  readonly ended: Promise<ServeEnd>;
  /** Stop serving (the TPM is powered off orderly), wait for the thread to exit. */
  stop(): Promise<void>;
}

export async function startCtrlWorker(opts: Omit<CtrlWorkerData, 'stopFd'>): Promise<CtrlWorker> {
  const [rd, wr] = sysPipe();
  const worker = startWorker(codeFile('drivers/swtpm_ctrl/worker'), { workerData: { ...opts, stopFd: rd } satisfies CtrlWorkerData });
  const exited = new Promise<void>((r) => worker.once('exit', () => r()));
  let fail: (e: unknown) => void = () => {};
  let done: (why: ServeEnd) => void = () => {};
  const ended = new Promise<ServeEnd>((res, rej) => {
    done = res;
    fail = rej;
  });
  ended.catch(() => {});
  let closed = false;
  const closePipe = () => {
    if (closed) return;
    closed = true;
    sysClose(rd);
    sysClose(wr);
  };
  const ready = new Promise<void>((res, rej) => {
    worker.on('message', (m: CtrlWorkerEvent) => {
      if (m.ev === 'ready') res();
      else if (m.ev === 'ended') done(m.why);
      else {
        const e = new VtpmError('EENGINE', 'control-channel server failed', { cause: errorFromWire(m) });
        rej(e);
        fail(e);
      }
    });
    worker.once('error', (e) => {
      const err = new VtpmError('EENGINE', 'control-channel server thread crashed', { cause: e });
      rej(err);
      fail(err);
    });
    worker.once('exit', (code) => {
      rej(new VtpmError('EENGINE', `control-channel server thread exited (${code}) before it was ready`));
      fail(new VtpmError('ECLOSED', `control-channel server thread exited (${code})`));
    });
  });
  void exited.then(closePipe);
  try {
    await ready;
  } catch (e) {
    await worker.terminate();
    throw e;
  }
  return {
    ended,
    async stop() {
      if (!closed) sysWrite(wr, new Uint8Array([1]), 1);
      await exited;
    },
  };
}
