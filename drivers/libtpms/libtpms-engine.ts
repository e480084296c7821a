// LibtpmsEngine: one vTPM (1.2 or 2.0) run by libtpms in this process, behind `Engine`.
//
// libtpms keeps global state, so one loaded copy of the library serves one engine per
// process. A second engine on the same library file is refused (also from another
// worker thread: the guard is a process-wide environment variable set through libc,
// which every thread of the process shares). Pass `privateCopy: true` to run one more
// engine on a private copy of the .so (own globals), as the TIS chip model does.
import koffi from 'koffi';
import { getenv, setenv, unsetenv } from '../base/libc.ts';
import { TPM_HEADER_SIZE, TPM_MAX_COMMAND_SIZE, TPM_ST_NO_SESSIONS, TPM_TAG_RSP_COMMAND, errorResponse } from '../tpm/command.ts';
import type { Engine, StateBlobType, StateStore, TpmVersion } from '../tpm/engine.ts';
import { VtpmError } from '../base/errors.ts';
import { TPM_BAD_PARAM_SIZE, TPM_RC_COMMAND_SIZE, tpm12RcName } from '../tpm/rc.ts';
import {
  type Libtpms,
  loadLibtpms,
  TPMLIB_INFO_ALL,
  TPMLIB_STATE_PERMANENT,
  TPMLIB_STATE_SAVE_STATE,
  TPMLIB_STATE_VOLATILE,
  TPMLIB_TPM_VERSION_1_2,
  TPMLIB_TPM_VERSION_2,
  TPM_RETRY,
  TPM_SUCCESS,
} from './binding.ts';

export interface LibtpmsEngineOptions {
  version: TpmVersion;
  store: StateStore;
  /** Path of libtpms.so (default: Debian's). */
  libraryPath?: string;
  /** Load a private copy of the library so this engine has its own globals. */
  privateCopy?: boolean;
  /** Do not start at construction: lets setState() hand blobs in first. */
  deferStart?: boolean;
}

const STATE_TYPE: Record<StateBlobType, number> = {
  permanent: TPMLIB_STATE_PERMANENT,
  volatile: TPMLIB_STATE_VOLATILE,
  savestate: TPMLIB_STATE_SAVE_STATE,
};

/** Process-wide claim on one library file (by inode), visible to every thread. */
function claimKey(lib: Libtpms): string {
  return `VTPM_LIBTPMS_CLAIM_${lib.fileId}`;
}

export function libtpmsErrorName(rc: number): string {
  return tpm12RcName(rc); // libtpms library calls answer with TPM 1.2 style codes
}

export class LibtpmsEngine implements Engine {
  readonly version: TpmVersion;
  private readonly lib: Libtpms;
  private readonly store: StateStore;
  private readonly claim: string;
  /** Native slots for TPMLIB_Process: [0..8) response pointer, [8..12) size, [12..16) buffer size.
   *  The response buffer libtpms allocates is kept and reused across commands (as swtpm does). */
  private readonly slots: bigint;
  private running = false;
  private disposed = false;
  private locality = 0;
  private readonly maxCommand: number;
  private readonly errorTag: number;
  /** Set when a state-store callback failed; reported with the failing command. */
  private storeError: unknown;

  constructor(opts: LibtpmsEngineOptions) {
    this.version = opts.version;
    this.store = opts.store;
    this.lib = loadLibtpms({ path: opts.libraryPath, privateCopy: opts.privateCopy });
    this.claim = claimKey(this.lib);
    if (getenv(this.claim)) {
      this.lib.dispose();
      throw new VtpmError(
        'EENGINE',
        `libtpms at ${this.lib.path} already runs an engine in this process: libtpms keeps global state, so use privateCopy for a second engine`,
      );
    }
    setenv(this.claim, String(process.pid));
    this.slots = koffi.alloc('uint8_t', 16) as bigint;
    new Uint8Array(koffi.view(this.slots, 16)).fill(0);
    this.errorTag = this.version === '2.0' ? TPM_ST_NO_SESSIONS : TPM_TAG_RSP_COMMAND;
    try {
      const rc = this.lib.chooseVersion(this.version === '2.0' ? TPMLIB_TPM_VERSION_2 : TPMLIB_TPM_VERSION_1_2);
      if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPMLIB_ChooseTPMVersion(${this.version}) failed: ${libtpmsErrorName(rc)}`);
      this.lib.registerCallbacks({
        nvramLoad: (name) => this.guardStore(() => this.store.load(name)),
        nvramStore: (name, data) => this.guardStore(() => this.store.store(name, data)),
        nvramDelete: (name, mustExist) =>
          this.guardStore(() => {
            const had = this.store.load(name) !== undefined;
            if (had) this.store.delete(name);
            return had || !mustExist;
          }),
        locality: () => this.locality,
      });
      this.maxCommand = Math.min(this.lib.setBufferSize(0).current, TPM_MAX_COMMAND_SIZE);
      if (!opts.deferStart) this.start();
    } catch (e) {
      this.release();
      throw e;
    }
  }

  /** Store failures must not vanish inside libtpms: keep the first, rethrow for koffi's guard. */
  private guardStore<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      this.storeError ??= e;
      throw e;
    }
  }

  get isRunning(): boolean {
    return this.running;
  }

  /** TPMLIB_MainInit: loads permanent (and pending volatile) state through the store. */
  start(): void {
    this.assertUsable();
    if (this.running) throw new VtpmError('EENGINE', 'engine already started');
    this.storeError = undefined;
    // Hand the stored blobs in through TPMLIB_SetState rather than letting MainInit pull
    // them through the loaddata callback: on libtpms 0.9.2 a TPM 2.0 permanent blob
    // loaded by the callback at power-on fails to unmarshal (NvPowerOn failure mode),
    // while the same bytes through SetState's cache load fine.
    let resumed = false;
    for (const [type, name] of [['permanent', 'permall'], ['volatile', 'volatilestate']] as const) {
      const blob = this.guardStore(() => this.store.load(name));
      if (blob) this.setState(type, blob);
      if (blob && type === 'volatile') resumed = true;
    }
    const rc = this.lib.mainInit();
    if (rc !== TPM_SUCCESS) {
      this.lib.terminate(); // leave libtpms ready for another attempt
      const cause = this.storeError;
      throw new VtpmError('ELIBTPMS', `TPMLIB_MainInit failed: ${libtpmsErrorName(rc)} (0x${rc.toString(16)})`, { cause });
    }
    this.running = true;
    // Volatile state is good for one resume only, as libtpms' own loader treats it.
    if (resumed) this.store.delete('volatilestate');
  }

  process(command: Uint8Array, locality = 0): Uint8Array {
    const n = this.run(command, locality);
    return new Uint8Array(koffi.view(this.responsePtr(), n)).slice();
  }

  /** Run a command and copy the response into `out` (no allocation); returns its length. */
  processInto(command: Uint8Array, out: Uint8Array, locality = 0): number {
    const n = this.run(command, locality);
    if (n > out.length) throw new VtpmError('EOVERSIZE', `response of ${n} bytes does not fit ${out.length}`);
    out.set(new Uint8Array(koffi.view(this.responsePtr(), n)));
    return n;
  }

  private responsePtr(): bigint {
    return BigInt(koffi.decode(this.slots, 'uint64_t') as number | bigint);
  }

  /** Runs one command; the response is in libtpms' buffer. Returns its length. */
  private run(command: Uint8Array, locality: number): number {
    this.assertUsable();
    if (!this.running) throw new VtpmError('EENGINE', 'engine is not started');
    if (command.length < TPM_HEADER_SIZE || command.length > this.maxCommand) {
      // libtpms would answer too, but never let bytes it cannot frame reach it.
      return this.canned(this.version === '2.0' ? TPM_RC_COMMAND_SIZE : TPM_BAD_PARAM_SIZE);
    }
    this.locality = locality;
    this.storeError = undefined;
    const rc = this.lib.process(this.slots, command, command.length);
    if (this.storeError !== undefined) {
      // The command's state did not persist: the guest must not see success.
      throw new VtpmError('ESTATE', 'state store failed during a TPM command', { cause: this.storeError });
    }
    if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPMLIB_Process failed: ${libtpmsErrorName(rc)} (0x${rc.toString(16)})`);
    return koffi.decode(this.slots, 8, 'uint32_t') as number;
  }

  /** Put a TPM error response in the response slot, like the TPM would answer. */
  private canned(rc: number): number {
    const resp = errorResponse(this.errorTag, rc);
    const view = new DataView(koffi.view(this.slots, 16));
    let ptr = view.getBigUint64(0, true);
    if (view.getUint32(12, true) < resp.length) {
      if (ptr) this.lib.free(ptr);
      ptr = this.lib.malloc(4096);
      view.setBigUint64(0, ptr, true);
      view.setUint32(12, 4096, true);
    }
    new Uint8Array(koffi.view(ptr, resp.length)).set(resp);
    view.setUint32(8, resp.length, true);
    return resp.length;
  }

  cancel(): void {
    if (this.running) this.lib.cancel();
  }

  getState(type: StateBlobType): Uint8Array | undefined {
    this.assertUsable();
    const rc = this.lib.getState(STATE_TYPE[type], this.slots);
    if (rc === TPM_RETRY) return undefined;
    if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPMLIB_GetState(${type}) failed: ${libtpmsErrorName(rc)}`);
    // GetState used the response-pointer slot for its own buffer: take it and restore ours.
    const view = new DataView(koffi.view(this.slots, 16));
    const p = view.getBigUint64(0, true);
    const len = view.getUint32(8, true);
    const blob = new Uint8Array(koffi.view(p, len)).slice();
    this.lib.free(p);
    view.setBigUint64(0, 0n, true);
    view.setUint32(12, 0, true);
    return blob;
  }

  setState(type: StateBlobType, blob: Uint8Array): void {
    this.assertUsable();
    if (this.running) throw new VtpmError('EENGINE', `setState(${type}) needs a stopped engine: terminate() first`);
    const rc = this.lib.setState(STATE_TYPE[type], blob);
    if (rc !== TPM_SUCCESS) throw new VtpmError('ELIBTPMS', `TPMLIB_SetState(${type}) refused the blob: ${libtpmsErrorName(rc)}`);
  }

  /** Stop the TPM; start() may follow (state reloads through the store). */
  stop(): void {
    if (!this.running) return;
    this.lib.terminate();
    this.running = false;
    this.freeResponse();
  }

  /** Stop and release the library for good (the process may create a new engine). */
  terminate(): void {
    if (this.disposed) return;
    this.stop();
    this.release();
  }

  info(): unknown {
    this.assertUsable();
    const s = this.lib.getInfo(TPMLIB_INFO_ALL);
    try {
      return JSON.parse(s);
    } catch (e) {
      throw new VtpmError('ELIBTPMS', 'TPMLIB_GetInfo returned invalid JSON', { cause: e });
    }
  }

  private freeResponse(): void {
    const view = new DataView(koffi.view(this.slots, 16));
    const p = view.getBigUint64(0, true);
    if (p) this.lib.free(p);
    view.setBigUint64(0, 0n, true);
    view.setUint32(8, 0, true);
    view.setUint32(12, 0, true);
  }

  private release(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (this.slots) {
      this.freeResponse();
      koffi.free(this.slots);
    }
    this.lib.dispose();
    unsetenv(this.claim);
  }

  private assertUsable(): void {
    if (this.disposed) throw new VtpmError('EENGINE', 'engine was terminated');
  }
}
