// One vTPM engine as a vtpmd thread hosts it: libtpms, its state store (plain files, or the
// manager over the state link), the guest-command handler with its recovery from a store
// failure, and the orderly stop and the suspend. Shared by the isolated vtpmd's one thread
// (main.ts) and the grouped vtpmd's engine threads (group-worker.ts), which host several
// of these, each on its own private copy of libtpms.
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import { DirStateStore } from '../drivers/host/state-dir.ts';
import { LibtpmsEngine } from '../drivers/libtpms/libtpms-engine.ts';
import { LinkStateStore } from '../drivers/statelink/client.ts';
import { bootTpm, shutdownTpm } from '../drivers/tpm/boot.ts';
import { failureResponse } from '../drivers/tpm/command.ts';
import type { StateStore, TpmVersion } from '../drivers/tpm/engine.ts';
import { TpmifFront } from '../drivers/tpmfront/tpmif-front.ts';
import type { TpmifParams } from '../drivers/xen/tpmif-page.ts';

/** What the engine boots from: plain blob files in a dir (vtpmd run by hand, tests), or
 *  the manager over the state link. */
export type EngineState = { dir: string } | { link: TpmifParams; uuid: string; timeoutMs: number };

export interface EngineBoot {
  version: TpmVersion;
  state: EngineState;
}

export interface HostedTpmOptions {
  /** A private copy of libtpms (own globals): needed for a second engine in a process. */
  privateCopy?: boolean;
  /** Where diagnostics go (one line each, no TPM bytes). */
  log: (line: string) => void;
  /** The buffer responses are built in (one per thread is enough: the response is copied
   *  to the shared page before the next command runs). */
  out?: Uint8Array;
}

/** TPM 1.2 gets TPM_ContinueSelfTest before the node is handed out, as Linux' tpm1 start
 *  sends it (tcsd expects a tested TPM). A TPM 2.0 is not self-tested up front: libtpms
 *  tests each algorithm on its first use, a guest kernel sends its own TPM2_SelfTest, and
 *  the full test (36 ms here) was most of a warm start's time. */
function selfTestAtBoot(v: TpmVersion): boolean {
  return v === '1.2';
}

export class HostedTpm {
  private readonly out: Uint8Array;
  private readonly failure: Uint8Array;
  private lastError = '';
  /** The TPM must be brought up again from its last durable state before the next command
   *  (a store failed: libtpms has gone into failure mode for good). */
  private reload = false;
  private ended = false;

  private constructor(
    readonly engine: LibtpmsEngine,
    private readonly store: StateStore & { close?(): void },
    private readonly o: HostedTpmOptions,
  ) {
    this.out = o.out ?? new Uint8Array(4096);
    this.failure = failureResponse(engine.version);
  }

  /** Open the store, load libtpms and bring the TPM up (Startup, and a self test for 1.2).
   *  Everything opened is released again when this throws. */
  static boot(b: EngineBoot, o: HostedTpmOptions): HostedTpm {
    const st = b.state;
    const store = 'dir' in st ? new DirStateStore(st.dir) : new LinkStateStore(TpmifFront.attach(st.link, { timeoutMs: st.timeoutMs }), st.uuid);
    let engine: LibtpmsEngine | undefined;
    try {
      engine = new LibtpmsEngine({ version: b.version, store, privateCopy: o.privateCopy === true });
      bootTpm(engine, { selfTest: selfTestAtBoot(b.version) });
      return new HostedTpm(engine, store, o);
    } catch (e) {
      engine?.terminate();
      if (store instanceof LinkStateStore) store.close();
      throw e;
    }
  }

  get version(): TpmVersion {
    return this.engine.version;
  }

  /** One guest command → its response (a view of the out buffer). Never throws: a failure
   *  below the guest is a TPM failure response, never a hang, and never an acknowledgement
   *  of state that was not stored; reported once per distinct cause. */
  readonly handle = (cmd: Uint8Array, locality: number): Uint8Array => {
    try {
      if (this.reload) this.restartFromStore();
      return this.out.subarray(0, this.engine.processInto(cmd, this.out, locality));
    } catch (e) {
      const msg = describeError(e);
      if (msg !== this.lastError) {
        this.lastError = msg;
        this.o.log(`command failed: ${msg}`);
      }
      if ((e as { code?: string }).code === 'ESTATE') this.reload = true;
      return this.failure;
    }
  };

  /** A TPM reset onto the state the store last acknowledged: what the guest saw acknowledged
   *  is all there; PCRs, sessions and loaded objects start afresh, as after a power cycle.
   *  Throws (and stays pending) while the store cannot even be read. */
  private restartFromStore(): void {
    this.engine.stop();
    this.engine.start();
    bootTpm(this.engine, { selfTest: selfTestAtBoot(this.engine.version) });
    this.reload = false;
    this.lastError = '';
    this.o.log('TPM restarted from its last stored state after a store failure');
  }

  /** An orderly stop: shut the TPM down as a platform does before power goes, so its next
   *  start is orderly (only a crash may count as a dictionary-attack failure), then end the
   *  engine, also when the shutdown failed. Call between commands. */
  stop(): void {
    if (this.ended) return;
    try {
      shutdownTpm(this.engine);
      this.o.log(`TPM ${this.engine.version} shut down (orderly)`);
    } catch (e) {
      this.o.log(`TPM shutdown failed, the next start will be a non-orderly one: ${describeError(e)}`);
    }
    this.end();
  }

  /** Suspend: the whole running TPM (PCRs, sessions, loaded objects: libtpms' volatile
   *  state) goes to the store as 'volatilestate', and the engine ends WITHOUT a TPM
   *  shutdown, so the next start resumes exactly here (the engine loads that blob before
   *  power-on and deletes it once resumed). Call between commands. A store that fails
   *  leaves the TPM running and throws ESTATE saying why: nothing is half-suspended. */
  suspend(): number {
    try {
      const blob = this.engine.getState('volatile');
      if (!blob) throw new VtpmError('EENGINE', 'libtpms has no volatile state to save');
      this.store.store('volatilestate', blob);
      this.end();
      return blob.length;
    } catch (e) {
      throw new VtpmError('ESTATE', 'suspend failed: the TPM keeps running', { cause: e });
    }
  }

  /** The engine released and the store's link unmapped. */
  private end(): void {
    this.ended = true;
    this.engine.terminate();
    this.store.close?.();
  }
}
