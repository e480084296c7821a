// vtpmd's engine thread for a QEMU/KVM guest: the same libtpms engine and manager-served
// state as for a tpm0 guest, but the guest side is the swtpm control channel
// (drivers/swtpm_ctrl) that QEMU's tpm_emulator backend speaks, on a unix socket. After
// QEMU ends a VM (SHUTDOWN, or it hangs up) the socket is served again for the VM's next
// start; the TPM waits for QEMU's INIT each time, as swtpm's does.
//
// Blobs QEMU fetches for its own migration (GET_STATEBLOB) leave sealed with AES-256-GCM
// under a key the manager derived for this instance: another host's QEMU can hand them to
// a vTPM only if the manager migrated the instance there (vtpm migrate); a blob sealed for
// another instance, or altered, is refused.
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { parentPort, workerData } from 'node:worker_threads';
import { encode } from 'cbor-x';
import { describeError, errorToWire, VtpmError } from '../drivers/base/errors.ts';
import { LibtpmsEngine } from '../drivers/libtpms/libtpms-engine.ts';
import { LinkStateStore } from '../drivers/statelink/client.ts';
import { Controller, type CtrlHooks } from '../drivers/swtpm_ctrl/controller.ts';
import { libtpmsPlatform } from '../drivers/swtpm_ctrl/platform.ts';
import { CtrlServer } from '../drivers/swtpm_ctrl/server.ts';
import type { StateBlobType, StateStore, TpmVersion } from '../drivers/tpm/engine.ts';
import { sysRead } from '../drivers/base/libc.ts';
import { STOP_SUSPEND } from './qemu.ts';
import { TpmifFront } from '../drivers/tpmfront/tpmif-front.ts';
import type { TpmifParams } from '../drivers/xen/tpmif-page.ts';

export interface QemuWorkerData {
  version: TpmVersion;
  state: { link: TpmifParams; uuid: string; timeoutMs: number };
  ctrlPath: string;
  /** The read end of the main thread's stop pipe. */
  stopFd: number;
  /** The key exported state blobs are sealed with (from the manager). */
  exportKey: Uint8Array;
}

export type QemuWorkerEvent = { ev: 'ready' } | { ev: 'served'; why: string } | { ev: 'suspended'; bytes: number } | ({ ev: 'error' } & ReturnType<typeof errorToWire>);


/** vtpm suspend of a QEMU guest's TPM: its whole running state (volatile) to the manager,
 *  no TPM shutdown (the engine resumes from it at its next power-on). */
function suspend(engine: LibtpmsEngine, store: StateStore): QemuWorkerEvent {
  try {
    const blob = engine.isRunning ? engine.getState('volatile') : undefined;
    if (blob) store.store('volatilestate', blob);
    return { ev: 'suspended', bytes: blob?.length ?? 0 };
  } catch (e) {
    return { ev: 'error', ...errorToWire(new VtpmError('ESTATE', 'suspend failed', { cause: e })) };
  }
}

const d = workerData as QemuWorkerData;
const port = parentPort!;
const log = (msg: string) => console.error(`${new Date().toISOString()} vtpmd: ${msg}`);

/** Exported blobs: iv(12) ‖ tag(16) ‖ ciphertext, bound to the instance and the blob type. */
function sealingHooks(key: Uint8Array, uuid: string): CtrlHooks {
  const aad = (type: StateBlobType) => encode(['vtpm-qemu-stateblob', 1, uuid, type]);
  return {
    exportBlob(type, plain) {
      const iv = randomBytes(12);
      const c = createCipheriv('aes-256-gcm', key, iv, { authTagLength: 16 });
      c.setAAD(aad(type));
      const ct = Buffer.concat([c.update(plain), c.final()]);
      return { data: Buffer.concat([iv, c.getAuthTag(), ct]), encrypted: true };
    },
    // Whatever the client's flags say (swtpm_ioctl --load sends none): only a blob sealed
    // for this instance opens; a plain libtpms blob fails authentication like any other.
    importBlob(type, data) {
      if (data.length < 28) throw new VtpmError('EPERM', `a ${type} blob must come sealed by this host's manager (vtpm migrate moves instances between hosts)`);
      try {
        const dec = createDecipheriv('aes-256-gcm', key, data.subarray(0, 12), { authTagLength: 16 });
        dec.setAAD(aad(type));
        dec.setAuthTag(data.subarray(12, 28));
        return Buffer.concat([dec.update(data.subarray(28)), dec.final()]);
      } catch (e) {
        throw new VtpmError('EINTEGRITY', `the ${type} blob QEMU sent was not sealed for this instance, or was altered`, { cause: e });
      }
    },
    log,
  };
}

let engine: LibtpmsEngine | undefined;
try {
  const store: StateStore = new LinkStateStore(TpmifFront.attach(d.state.link, { timeoutMs: d.state.timeoutMs }), d.state.uuid);
  engine = new LibtpmsEngine({ version: d.version, store, deferStart: true });
  const controller = new Controller({ engine, store, platform: libtpmsPlatform(engine), hooks: sealingHooks(d.exportKey, d.state.uuid) });
  let server = new CtrlServer({ controller, ctrl: { listenPath: d.ctrlPath }, stopFd: d.stopFd, log });
  port.postMessage({ ev: 'ready' } satisfies QemuWorkerEvent);
  for (;;) {
    const why = server.serveSync();
    server.close();
    if (why === 'stopped') {
      // What the main thread wrote: SUSPEND, or anything else for an orderly stop.
      const what = new Uint8Array(1);
      sysRead(d.stopFd, what, 1);
      if (what[0] === STOP_SUSPEND) port.postMessage(suspend(engine, store));
      else controller.stopTpm(); // vtpm stop: powered off orderly, its last state to the manager
      break;
    }
    log(`QEMU ended the VM (${why}): the control socket waits for its next start`);
    port.postMessage({ ev: 'served', why } satisfies QemuWorkerEvent);
    server = new CtrlServer({ controller, ctrl: { listenPath: d.ctrlPath }, stopFd: d.stopFd, log });
  }
} catch (e) {
  log(`control channel failed: ${describeError(e)}`);
  port.postMessage({ ev: 'error', ...errorToWire(e) } satisfies QemuWorkerEvent);
} finally {
  engine?.terminate();
}
