// The manager's (and tests') side of a grouped vtpmd (group.ts): start the group process,
// then add, link, stop and suspend its members over its control socket.
//
//   const g = await VtpmdGroup.start({ dir: runDir, group: 'g0', log: join(runDir, 'groups', 'g0.log') })
//   const { domid } = await g.add({ name, tpm, uuid })       // the member's domain joined
//   // the manager opens its state back end for `domid` (XenbusBack.start(..., { frontId: domid }))
//   await g.link({ name, manager: managerDomid, front })      // resolves once the TPM is up
//   await g.stop(name) | await g.suspend(name) → bytes | await g.list()
//   g.exited  // the process ended: every member is gone (their guests see EIO)
import { VtpmError } from '../drivers/base/errors.ts';
import type { Msg } from '../drivers/base/frame.ts';
import { builtScript } from '../drivers/base/modules.ts';
import { RpcClient } from '../drivers/base/rpc.ts';
import { startDaemon, stopProcess } from '../drivers/host/daemon.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { GROUP_VERSION } from './group.ts';
import type { MemberInfo } from './group-member.ts';

export type { MemberInfo } from './group-member.ts';

/** An orderly stop runs a TPM shutdown whose stores go through the manager. */
const STOP_TIMEOUT_MS = 60_000;
const LINK_TIMEOUT_MS = 60_000;

export interface GroupStartOptions {
  dir: string;
  group: string;
  /** The group's log file (0600). */
  log: string;
  threads?: number;
  /** The vtpmd script (default: the built JavaScript, build/vtpmd/main.js: call
   *  ensureBuilt() first). */
  script?: string;
  timeoutMs?: number;
}

export class VtpmdGroup {
  private constructor(
    readonly pid: number,
    readonly socket: string,
    /** The group process's own domain (its engine threads' control channels live there). */
    readonly domid: number,
    private readonly rpc: RpcClient,
    readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>,
  ) {}

  /** Start `vtpmd --dir DIR --group G` and connect to it; resolves once it takes requests. */
  static async start(o: GroupStartOptions): Promise<VtpmdGroup> {
    const script = o.script ?? builtScript('vtpmd/main');
    const d = await startDaemon(script, ['--dir', o.dir, '--group', o.group, ...(o.threads ? ['--threads', String(o.threads)] : [])], {
      log: o.log,
      timeoutMs: o.timeoutMs ?? 30_000,
    });
    try {
      const socket = String(d.info.socket);
      const rpc = await RpcClient.connect(socket, `vtpmd group ${o.group}`);
      return new VtpmdGroup(d.pid, socket, Number(d.info.domid), rpc, d.exited);
    } catch (e) {
      await stopProcess(d.pid);
      throw e;
    }
  }

  private call(op: string, args: Msg, timeoutMs: number): Promise<Msg> {
    return this.rpc.request(op, { group: GROUP_VERSION, ...args }, timeoutMs);
  }

  /** A new member: its domain joins; its domid is what the manager's state back end and
   *  the guest's front end name as their peer. */
  async add(m: { name: string; tpm: TpmVersion; uuid: string }): Promise<{ domid: number }> {
    const r = await this.call('add', m, 30_000);
    return { domid: Number(r.domid) };
  }

  /** Connect the member's state link to the manager's back end (the manager opened it for
   *  the member's domid), boot its TPM from the state served there, and publish the back
   *  end for guest domain `front`. Resolves once the TPM is up. */
  async link(m: { name: string; manager: number; front: number }): Promise<{ thread: number }> {
    const r = await this.call('link', m, LINK_TIMEOUT_MS);
    return { thread: Number(r.thread) };
  }

  /** Orderly TPM shutdown of that member only; its links closed, its domain left. */
  async stop(name: string): Promise<void> {
    await this.call('stop', { name }, STOP_TIMEOUT_MS);
  }

  /** The member's running TPM stored as 'volatilestate'; its engine ends without shutdown.
   *  Rejects (ESTATE) when it could not be stored: the TPM was then stopped orderly. */
  async suspend(name: string): Promise<number> {
    const r = await this.call('suspend', { name }, STOP_TIMEOUT_MS);
    if (typeof r.bytes !== 'number') throw new VtpmError('EPROTO', 'suspend reply without bytes');
    return r.bytes;
  }

  async list(): Promise<MemberInfo[]> {
    const r = await this.call('list', {}, 10_000);
    if (!Array.isArray(r.engines)) throw new VtpmError('EPROTO', 'list reply without engines');
    return r.engines as MemberInfo[];
  }

  /** SIGTERM: every member stopped orderly, then the process exits 0. */
  async shutdown(timeoutMs = 60_000): Promise<'exited' | 'killed' | 'absent'> {
    this.rpc.destroy();
    return stopProcess(this.pid, timeoutMs);
  }
}
