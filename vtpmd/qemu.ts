// vtpmd serving a QEMU/KVM guest (--qemu CTRL): the engine thread (qemu-worker.ts) serves
// the swtpm control channel on CTRL; this thread only starts and stops it. SIGTERM: the
// TPM is powered off orderly (its last state reaches the manager), then vtpmd exits 0.
import { errorFromWire, VtpmError } from '../drivers/base/errors.ts';
import { sysClose, sysWrite } from '../drivers/base/libc.ts';
import { sysPipe } from '../drivers/base/libc-sockets.ts';
import { codeFile, startWorker } from '../drivers/base/modules.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import type { QemuWorkerData, QemuWorkerEvent } from './qemu-worker.ts';

/** The byte written to the engine thread's stop pipe to suspend (any other: stop). */
export const STOP_SUSPEND = 2;

export interface QemuGuest {
  /** Stop serving; resolves once the engine thread has powered the TPM off and exited. */
  stop(): Promise<void>;
  /** Suspend: the running TPM's state to the manager, no TPM shutdown; resolves with the
   *  bytes stored (0: the TPM was off, nothing to keep), rejects when it could not. */
  suspend(): Promise<number>;
  /** Resolves if the engine thread ends by itself (a failure). */
  readonly failed: Promise<Error>;
}

export async function serveQemuGuest(o: { version: TpmVersion; state: QemuWorkerData['state']; ctrlPath: string; exportKey: Uint8Array; log: (l: string) => void }): Promise<QemuGuest> {
  const [rd, wr] = sysPipe();
  const worker = startWorker(codeFile('vtpmd/qemu-worker'), {
    workerData: { version: o.version, state: o.state, ctrlPath: o.ctrlPath, stopFd: rd, exportKey: o.exportKey } satisfies QemuWorkerData,
  });
  const exited = new Promise<void>((r) => worker.once('exit', () => r()));
  void exited.then(() => {
    sysClose(rd);
    sysClose(wr);
  });
  let suspended: ((m: QemuWorkerEvent) => void) | null = null;
  let failed!: (e: Error) => void;
  const failedP = new Promise<Error>((r) => (failed = r));
  await new Promise<void>((resolve, reject) => {
    worker.on('message', (m: QemuWorkerEvent) => {
      if (m.ev === 'ready') resolve();
      else if (suspended && (m.ev === 'suspended' || m.ev === 'error')) suspended(m);
      else if (m.ev === 'error') {
        const e = new VtpmError('EENGINE', `TPM ${o.version} for QEMU failed`, { cause: errorFromWire(m) });
        reject(e);
        failed(e);
      }
    });
    worker.once('error', (e) => {
      const err = new VtpmError('EENGINE', 'engine thread crashed', { cause: e });
      reject(err);
      failed(err);
    });
    void exited.then(() => failed(new VtpmError('ECLOSED', 'the engine thread exited')));
  });
  o.log(`serving QEMU's control channel at ${o.ctrlPath}`);
  let stopping: Promise<void> | null = null;
  return {
    failed: failedP,
    suspend: async () => {
      const ev = new Promise<QemuWorkerEvent>((r) => (suspended = r));
      stopping = exited;
      sysWrite(wr, new Uint8Array([STOP_SUSPEND]), 1);
      const m = await ev;
      await exited;
      if (m.ev === 'suspended') return m.bytes;
      throw new VtpmError('ESTATE', 'suspend failed', { cause: m.ev === 'error' ? errorFromWire(m) : undefined });
    },
    stop: () =>
      (stopping ??= (async () => {
        sysWrite(wr, new Uint8Array([1]), 1);
        await exited;
      })()),
  };
}
