// One vTPM of a grouped vtpmd, as its main thread runs it: the member's own domain (one per
// vTPM, as Xen's stub domains: named vtpmd-NAME, so its grants and channels are its own),
// its state link to the manager, and the xenbus back end its guest connects to. Its engine
// lives on one of the group's engine threads (group-pool.ts). Same order as the
// one-instance vtpmd (main.ts serveTpm0): state link first, then the TPM booted from what
// the manager serves, then the guest's back end; stop in reverse.
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { XenbusBack } from '../drivers/tpmback/xenbus-back.ts';
import { XenbusFront } from '../drivers/tpmfront/xenbus-front.ts';
import { Domain } from '../drivers/xen/domain.ts';
import type { EnginePool, EngineThread } from './group-pool.ts';

/** How long a state request may wait for the manager before the TPM command fails. */
const STATE_TIMEOUT_MS = 10_000;
/** How long the manager's back end may take to connect the state link. */
const LINK_TIMEOUT_MS = 30_000;

export type MemberPhase = 'added' | 'linking' | 'up' | 'stopping';

export interface MemberInfo {
  name: string;
  tpm: TpmVersion;
  uuid: string;
  domid: number;
  phase: MemberPhase;
  /** The engine thread (once linked). */
  thread?: number;
  /** Whether a guest front end is connected now. */
  guest: boolean;
}

export class Member {
  phase: MemberPhase = 'added';
  private thread: EngineThread | undefined;
  private stateLink: XenbusFront | undefined;
  private back: XenbusBack | undefined;
  private guest = false;

  private constructor(
    readonly name: string,
    readonly tpm: TpmVersion,
    readonly uuid: string,
    readonly domain: Domain,
    private readonly log: (line: string) => void,
  ) {}

  /** Join the member's own domain. */
  static async add(dir: string, o: { name: string; tpm: TpmVersion; uuid: string; log: (line: string) => void }): Promise<Member> {
    const domain = await Domain.join(dir, { name: `vtpmd-${o.name}` });
    return new Member(o.name, o.tpm, o.uuid, domain, (line) => o.log(`${o.name}: ${line}`));
  }

  info(): MemberInfo {
    return { name: this.name, tpm: this.tpm, uuid: this.uuid, domid: this.domain.domid, phase: this.phase, ...(this.thread ? { thread: this.thread.index } : {}), guest: this.guest };
  }

  /** Connect the state link to the manager's back end, boot the engine on the least-loaded
   *  thread from the state the manager serves, publish the guest's back end. Resolves once
   *  the TPM is up and the back end waits for `front`. On failure every piece opened here
   *  is closed again (the member is back to 'added'). */
  async link(pool: EnginePool, manager: number, front: number): Promise<{ thread: number }> {
    if (this.phase !== 'added') throw new VtpmError('EBUSY', `${this.name} is ${this.phase}, not waiting for its link`);
    this.phase = 'linking';
    try {
      this.stateLink = await XenbusFront.start(this.domain, { backendId: manager, reconnect: false });
      const link = await this.stateLink.connected(LINK_TIMEOUT_MS);
      this.stateLink.onDisconnect(() => this.log('the state link to the manager went away: commands that store state now fail'));
      this.log(`state link to the manager (domain ${manager}) connected`);
      const thread = (this.thread = pool.place());
      try {
        await thread.request({ op: 'boot', name: this.name, boot: { version: this.tpm, state: { link: link.params, uuid: this.uuid, timeoutMs: STATE_TIMEOUT_MS } } });
      } catch (e) {
        pool.release(thread);
        this.thread = undefined;
        throw new VtpmError('EENGINE', `TPM ${this.tpm} of ${this.name} failed to start`, { cause: e });
      }
      const back = (this.back = await XenbusBack.start(this.domain, { frontId: front, uuid: this.uuid }));
      back.onConnect((l) => {
        this.guest = true;
        this.log(`front end ${l.frontId} connected`);
        thread.request({ op: 'serve', name: this.name, tpmif: l.params }).catch((e) => this.log(`cannot serve front end ${l.frontId}: ${describeError(e)}`));
      });
      // The channel's close reaches the engine thread's mux by itself.
      back.onDisconnect(() => (this.guest = false));
      this.phase = 'up';
      this.log(`TPM ${this.tpm} up on thread ${thread.index}, domain ${this.domain.domid}, waiting for front end ${front}`);
      return { thread: thread.index };
    } catch (e) {
      await this.unlink(pool);
      this.phase = 'added';
      throw e;
    }
  }

  /** The guest channel ended (reported by the engine thread). */
  guestClosed(): void {
    if (this.phase === 'up') this.log('front end went away (the TPM keeps running for the next one)');
  }

  /** Orderly: the guest's back end closes, the TPM is shut down (TPM2_Shutdown(STATE), its
   *  last stores still reach the manager), the state link closes, the domain is left. */
  async stop(pool: EnginePool): Promise<void> {
    this.phase = 'stopping';
    await this.unserve();
    await this.closeBack();
    await this.stopEngine(pool);
    await this.leave(pool);
    this.log('stopped');
  }

  /** The running TPM's volatile state goes to the manager as 'volatilestate' and the engine
   *  ends without a shutdown. If it cannot be stored, the TPM is stopped orderly instead
   *  and this rejects (ESTATE) saying so. Resolves with the bytes stored. */
  async suspend(pool: EnginePool): Promise<number> {
    if (this.phase !== 'up' || !this.thread) throw new VtpmError('EBUSY', `${this.name} is ${this.phase}, not running`);
    this.phase = 'stopping';
    // The guest is cut off first: no command may run after its state was taken.
    await this.unserve();
    await this.closeBack();
    const thread = this.thread;
    let bytes: number;
    try {
      bytes = (await thread.request({ op: 'suspend', name: this.name }))!;
    } catch (e) {
      await thread.request({ op: 'stop', name: this.name }).catch((s) => this.log(`stop after a failed suspend: ${describeError(s)}`));
      pool.release(thread);
      this.thread = undefined;
      await this.leave(pool);
      throw new VtpmError('ESTATE', `${this.name} could not store its state and stopped orderly instead`, { cause: e });
    }
    pool.release(thread);
    this.thread = undefined;
    await this.leave(pool);
    this.log(`suspended: ${bytes} bytes of volatile state stored with the manager`);
    return bytes;
  }

  /** The engine thread lets go of the guest's channel (before the back end releases it). */
  private async unserve(): Promise<void> {
    await this.thread?.request({ op: 'unserve', name: this.name }).catch((e) => this.log(`unserve: ${describeError(e)}`));
  }

  private async closeBack(): Promise<void> {
    await this.back?.close().catch((e) => this.log(`xenbus close: ${describeError(e)}`));
    this.back = undefined;
    this.guest = false;
  }

  /** Its engine, if it booted: shut down orderly on its thread, which is then released. */
  private async stopEngine(pool: EnginePool): Promise<void> {
    if (!this.thread) return;
    await this.thread.request({ op: 'stop', name: this.name }).catch((e) => this.log(`stop: ${describeError(e)}`));
    pool.release(this.thread);
    this.thread = undefined;
  }

  /** The state link closed (link failed half-way: also the engine, if it booted). */
  private async unlink(pool: EnginePool): Promise<void> {
    await this.unserve();
    await this.closeBack();
    await this.stopEngine(pool);
    await this.stateLink?.close().catch((e) => this.log(`state link close: ${describeError(e)}`));
    this.stateLink = undefined;
  }

  private async leave(pool: EnginePool): Promise<void> {
    await this.unlink(pool);
    await this.domain.leave().catch((e) => this.log(`leaving domain ${this.domain.domid}: ${describeError(e)}`));
  }
}
