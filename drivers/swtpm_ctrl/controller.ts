// What each control command does, swtpm's semantics (src/swtpm/ctrlchannel.c, mainloop.c)
// over an `Engine` that can be stopped and started again and the StateStore its NVRAM goes
// to. Synchronous and socket-free: the server feeds it whole frames and TPM commands.
// State blobs leave and enter only through the owner's hooks, so an owner (the manager)
// can keep exported blobs encrypted for itself.
import { describeError, VtpmError } from '../base/errors.ts';
import { failureResponse, parseHeader, TPM_HEADER_SIZE } from '../tpm/command.ts';
import type { Engine, StateBlobType, StateStore } from '../tpm/engine.ts';
import { Reader } from '../tpm/marshal.ts';
import { bootTpm } from '../tpm/boot.ts';
import * as tpm2 from '../tpm/tpm2.ts';
import { TPM_RC_INITIALIZE } from '../tpm/rc.ts';
import type { PlatformOps } from './platform.ts';
import {
  BLOB_NAME,
  BLOB_TYPE,
  bufferSizeResponse,
  capabilities,
  capabilityResponse,
  CMD,
  cmdName,
  configResponse,
  type CtrlRequest,
  establishedResponse,
  infoResponse,
  NEEDS_RUNNING,
  NEEDS_STOPPED,
  parseRequest,
  PTM_INIT_FLAG_DELETE_VOLATILE,
  PTM_STATE_FLAG_DECRYPTED,
  PTM_STATE_FLAG_ENCRYPTED,
  RES,
  resultResponse,
  stateBlobResponse,
  TPM_BUFFER_MAX,
} from './protocol.ts';

/** An Engine whose TPM can be powered off and on again (LibtpmsEngine is one): INIT is a
 *  TPMLIB_Terminate + TPMLIB_MainInit, as in swtpm. */
export interface CtrlEngine extends Engine {
  start(): void;
  stop(): void;
  readonly isRunning: boolean;
}

/** What the owner decides; every hook is optional (defaults: plain blobs, no keys). */
export interface CtrlHooks {
  /** A blob leaving through GET_STATEBLOB. `decrypted`: the client asked for plain bytes
   *  (PTM_STATE_FLAG_DECRYPTED; QEMU always does). Return what to send and whether it is
   *  encrypted (sets PTM_STATE_FLAG_ENCRYPTED). Throw to refuse (TPM_FAIL). */
  exportBlob?(type: StateBlobType, plain: Uint8Array, opts: { decrypted: boolean }): { data: Uint8Array; encrypted: boolean };
  /** A blob arriving through SET_STATEBLOB (`encrypted` from the client's flags): return the
   *  plain libtpms bytes to store. Throw to refuse (TPM_FAIL). */
  importBlob?(type: StateBlobType, data: Uint8Array, opts: { encrypted: boolean }): Uint8Array;
  /** GET_CONFIG's flags (PTM_CONFIG_FLAG_FILE_KEY | PTM_CONFIG_FLAG_MIGRATION_KEY). */
  configFlags?(): number;
  /** LOCK_STORAGE (QEMU after a migration fell back): true when the state is this
   *  instance's to write. `retries` × 10 ms is how long the client allows. */
  lockStorage?(retries: number): boolean;
  /** After GET_STATEBLOB(savestate): the outgoing side of a migration is done with the
   *  state (swtpm unlocks its storage here). */
  unlockStorage?(): void;
  /** Lifecycle: after INIT succeeded, after the TPM was stopped (STOP, SHUTDOWN, INIT's
   *  power-off), after STORE_VOLATILE stored the volatile blob. */
  onEvent?(ev: 'init' | 'stopped' | 'volatile-stored'): void;
  log?(msg: string): void;
}

export interface ControllerOptions {
  engine: CtrlEngine;
  /** The store the engine's NVRAM callbacks use (SET_STATEBLOB writes blobs there for the
   *  next INIT; savestate and STORE_VOLATILE live there). */
  store: StateStore;
  platform: PlatformOps;
  hooks?: CtrlHooks;
  /** swtpm --locality reject-locality-4. */
  rejectLocality4?: boolean;
  /** swtpm --flags startup-clear: send Startup(CLEAR) after every INIT (tests; a real
   *  guest's firmware sends Startup itself). */
  startupAfterInit?: boolean;
}

export interface CtrlOutcome {
  response: Uint8Array;
  /** The descriptor SET_DATAFD accepted (the server now owns it). */
  dataFd?: number;
  /** SHUTDOWN: the server ends after sending the response. */
  terminate?: boolean;
}

const TPM2_CC_SHUTDOWN = 0x145;

export class Controller {
  readonly version: '1.2' | '2.0';
  /** The locality of data-channel commands (SET_LOCALITY, or a TCG command header). */
  locality = 0;
  /** The largest TPM command the data channel takes (SET_BUFFERSIZE). */
  bufferSize = TPM_BUFFER_MAX;
  private lastOrdinal = 0;
  private readonly out = new Uint8Array(2 * TPM_BUFFER_MAX);
  private readonly failure: Uint8Array;
  private lastError = '';

  constructor(private readonly o: ControllerOptions) {
    this.version = o.engine.version;
    this.failure = failureResponse(this.version);
    if (this.o.engine.isRunning) this.bufferSize = this.o.platform.bufferSize(0).size;
  }

  get running(): boolean {
    return this.o.engine.isRunning;
  }

  private log(msg: string): void {
    this.o.hooks?.log?.(msg);
  }

  /** One whole control frame (see protocol.frameNeed); `fds` came with it (SCM_RIGHTS). A
   *  descriptor not taken over by the outcome is closed by the caller. */
  handle(frame: Uint8Array, fds: readonly number[], dataConnected: boolean): CtrlOutcome {
    const p = parseRequest(frame);
    const cmd = p.ok ? p.req.cmd : p.cmd;
    // swtpm checks the TPM's power before the payload for these.
    if (NEEDS_RUNNING.has(cmd) && !this.running) return this.refuse(cmd, RES.BAD_ORDINAL, 'TPM is not running');
    if (NEEDS_STOPPED.has(cmd) && this.running) return this.refuse(cmd, RES.BAD_ORDINAL, 'TPM is running (STOP it first)');
    if (!p.ok) return this.refuse(cmd, p.result, p.why);
    try {
      return this.run(p.req, fds, dataConnected);
    } catch (e) {
      this.log(`${cmdName(cmd)} failed: ${describeError(e)}`);
      return { response: resultResponse(RES.FAIL) };
    }
  }

  private refuse(cmd: number, result: number, why: string): CtrlOutcome {
    this.log(`${cmdName(cmd)} refused (0x${result.toString(16)}): ${why}`);
    return { response: resultResponse(result) };
  }

  private run(req: CtrlRequest, fds: readonly number[], dataConnected: boolean): CtrlOutcome {
    const e = this.o.engine;
    const p = this.o.platform;
    const ok = { response: resultResponse(RES.SUCCESS) };
    switch (req.cmd) {
      case CMD.GET_CAPABILITY:
        return { response: capabilityResponse(capabilities(this.version)) };
      case CMD.INIT:
        this.powerOff();
        return { response: resultResponse(this.powerOn(req.flags)) };
      case CMD.STOP:
        this.powerOff();
        return ok;
      case CMD.SHUTDOWN:
        this.powerOff();
        return { ...ok, terminate: true };
      case CMD.GET_TPMESTABLISHED: {
        const r = p.getEstablished();
        return { response: establishedResponse(r.result, r.established) };
      }
      case CMD.RESET_TPMESTABLISHED:
        if (req.locality > 4) return this.refuse(req.cmd, RES.BAD_LOCALITY, `locality ${req.locality}`);
        return { response: resultResponse(p.resetEstablished(req.locality)) };
      case CMD.SET_LOCALITY:
        if (req.locality > 4 || (req.locality === 4 && this.o.rejectLocality4)) return this.refuse(req.cmd, RES.BAD_LOCALITY, `locality ${req.locality}`);
        this.locality = req.locality;
        return ok;
      case CMD.HASH_START:
        return { response: resultResponse(p.hashStart()) };
      case CMD.HASH_DATA:
        return { response: resultResponse(p.hashData(req.data)) };
      case CMD.HASH_END:
        return { response: resultResponse(p.hashEnd()) };
      case CMD.CANCEL_TPM_CMD:
        // Commands run on this same thread, so one in flight has finished by now (swtpm
        // has the same limit); the flag still reaches libtpms.
        e.cancel();
        return ok;
      case CMD.STORE_VOLATILE: {
        const blob = e.getState('volatile');
        if (!blob) return { response: resultResponse(RES.FAIL) };
        this.o.store.store(BLOB_NAME.volatile, blob);
        this.o.hooks?.onEvent?.('volatile-stored');
        return ok;
      }
      case CMD.GET_STATEBLOB:
        return { response: this.getBlob(req.type, req.flags, req.offset) };
      case CMD.SET_STATEBLOB:
        return { response: resultResponse(this.setBlob(req.type, req.flags, req.data)) };
      case CMD.GET_CONFIG:
        return { response: configResponse(this.o.hooks?.configFlags?.() ?? 0) };
      case CMD.SET_DATAFD: {
        if (dataConnected) return this.refuse(req.cmd, RES.IOERROR, 'a data channel is already connected');
        const fd = fds[0];
        if (fd === undefined || fd < 0) return this.refuse(req.cmd, RES.BAD_PARAMETER, 'no descriptor came with the message');
        return { ...ok, dataFd: fd };
      }
      case CMD.SET_BUFFERSIZE: {
        if (req.size > 0 && this.running) return this.refuse(req.cmd, RES.BAD_ORDINAL, 'buffer size can only change while stopped');
        const r = p.bufferSize(req.size);
        this.bufferSize = r.size;
        return { response: bufferSizeResponse(r.size, r.min, r.max) };
      }
      case CMD.GET_INFO: {
        const resp = infoResponse(p.info(Number(req.flags & 0xffffffffn)), req.offset);
        return resp ? { response: resp } : this.refuse(req.cmd, RES.BAD_PARAMETER, `offset ${req.offset} beyond the info`);
      }
      case CMD.LOCK_STORAGE:
        return { response: resultResponse(this.o.hooks?.lockStorage?.(req.retries) ?? true ? RES.SUCCESS : RES.FAIL) };
    }
  }

  /** Power the TPM off as STOP does (the owner ending the server, a hang-up). */
  stopTpm(): void {
    this.powerOff();
  }

  /** Before the TPM loses power (STOP, SHUTDOWN, INIT): a TPM 2.0 gets the TPM2_Shutdown the
   *  guest did not send (swtpm's tpmlib_maybe_send_tpm2_shutdown), so the next start is an
   *  orderly one; then libtpms is terminated. */
  private powerOff(): void {
    const e = this.o.engine;
    if (!e.isRunning) return;
    if (this.version === '2.0' && this.lastOrdinal !== TPM2_CC_SHUTDOWN) {
      for (const su of [tpm2.TPM_SU_STATE, tpm2.TPM_SU_CLEAR]) {
        let rc: number;
        try {
          rc = parseHeader(e.process(tpm2.shutdown(su)), 'Shutdown response').code;
        } catch {
          break; // the engine failed: nothing more to save
        }
        if (rc === 0 || rc === TPM_RC_INITIALIZE) break;
      }
    }
    e.stop();
    this.lastOrdinal = 0;
    this.o.hooks?.onEvent?.('stopped');
  }

  private powerOn(flags: number): number {
    const e = this.o.engine;
    try {
      e.start(); // loads permall and, once, volatilestate through the store
      if (flags & PTM_INIT_FLAG_DELETE_VOLATILE) this.o.store.delete(BLOB_NAME.volatile);
      if (this.o.startupAfterInit) bootTpm(e, { selfTest: false });
    } catch (err) {
      this.log(`INIT failed: ${describeError(err)}`);
      if (e.isRunning) e.stop();
      return RES.FAIL;
    }
    this.bufferSize = this.o.platform.bufferSize(0).size;
    this.o.hooks?.onEvent?.('init');
    return RES.SUCCESS;
  }

  private getBlob(code: number, reqFlags: number, offset: number): Uint8Array {
    const type = BLOB_TYPE[code];
    if (!type) return stateBlobResponse(RES.FAIL, 0, undefined, 0);
    const e = this.o.engine;
    let plain: Uint8Array | undefined;
    if (type === 'savestate') plain = this.o.store.load(BLOB_NAME.savestate);
    else plain = e.getState(type);
    // swtpm leaves no volatile state behind once it was handed out.
    if (type === 'volatile') this.o.store.delete(BLOB_NAME.volatile);
    let resp: Uint8Array;
    if (!plain) {
      resp = stateBlobResponse(RES.RETRY, 0, undefined, 0); // no such blob: non-fatal, empty
    } else {
      const hook = this.o.hooks?.exportBlob;
      const out = hook ? hook(type, plain, { decrypted: (reqFlags & PTM_STATE_FLAG_DECRYPTED) !== 0 }) : { data: plain, encrypted: false };
      resp = stateBlobResponse(RES.SUCCESS, out.encrypted ? PTM_STATE_FLAG_ENCRYPTED : 0, out.data, offset);
    }
    if (type === 'savestate') this.o.hooks?.unlockStorage?.();
    return resp;
  }

  private setBlob(code: number, flags: number, data: Uint8Array): number {
    const type = BLOB_TYPE[code];
    if (!type) return RES.BAD_PARAMETER;
    if (data.length === 0) {
      this.o.store.delete(BLOB_NAME[type]); // an empty blob: the TPM has none of this type
      return RES.SUCCESS;
    }
    const hook = this.o.hooks?.importBlob;
    const plain = hook ? hook(type, data, { encrypted: (flags & PTM_STATE_FLAG_ENCRYPTED) !== 0 }) : data;
    this.o.store.store(BLOB_NAME[type], plain);
    return RES.SUCCESS;
  }

  /** One TPM command from the data channel; the response is a view valid until the next
   *  call. A stopped TPM answers with the failure response (as swtpm does before INIT: QEMU
   *  reads the TPM family from its tag). */
  processTpm(cmd: Uint8Array, locality: number): Uint8Array {
    if (!this.running) return this.failure;
    // The ordinal of the last command, for the TPM2_Shutdown decision at power-off.
    this.lastOrdinal = cmd.length >= TPM_HEADER_SIZE ? new Reader(cmd, 6).u32('ordinal') : 0;
    try {
      const e = this.o.engine;
      if (e.processInto) return this.out.subarray(0, e.processInto(cmd, this.out, locality));
      return e.process(cmd, locality);
    } catch (err) {
      const msg = describeError(err);
      if (msg !== this.lastError) {
        this.lastError = msg;
        this.log(`TPM command failed: ${msg}`);
      }
      return this.failure;
    }
  }
}

export function isCtrlEngine(e: Engine): e is CtrlEngine {
  const c = e as Partial<CtrlEngine>;
  if (typeof c.start !== 'function' || typeof c.stop !== 'function' || typeof c.isRunning !== 'boolean') {
    throw new VtpmError('EENGINE', 'the control channel needs an engine with start(), stop() and isRunning (LibtpmsEngine)');
  }
  return true;
}
