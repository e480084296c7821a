// A run's vtpmd, whichever hosts its engine: a process of its own (isolated: started cold
// or taken from the warm pool) or a member of its group's process (vtpmd --group). launch.ts
// drives either the same way: it has joined (its domid is what the state back end and the
// guest's front end name as their peer), it is linked once the manager's back end waits
// for it, and it is stopped or suspended after the front end.
import { join } from 'node:path';
import { VtpmError } from '../drivers/base/errors.ts';
import { builtScript } from '../drivers/base/modules.ts';
import { alive, startDaemon, stopProcess, START_TIMEOUT_MS } from '../drivers/host/daemon.ts';
import { EXIT_OK, SUSPEND_FAILED } from '../vtpmd/exit-codes.ts';
import type { GroupHost } from './group-host.ts';
import type { InstanceRecord } from './store/table.ts';
import type { WarmVtpmd } from './warm-pool.ts';


export interface VtpmdRun {
  readonly domid: number;
  /** The process hosting the engine (shared by a group's members). */
  readonly pid: number;
  /** Its own process (recorded with the run): not a group's. */
  readonly owned: boolean;
  /** The manager's state back end waits for it: go on (`peer`: "MANAGER FRONT" or, for
   *  QEMU, "MANAGER EXPORT-KEY"). Resolves once it has taken the line (a process) or its
   *  TPM is up (a member). */
  link(managerDomid: number, peer: string, front?: number): Promise<void>;
  dead(): string | undefined;
  /** Resolves when it ends by itself: how. */
  readonly died: Promise<string>;
  /** Orderly TPM shutdown (its last stores still reach the manager). */
  stop(): Promise<void>;
  /** The running TPM stored as 'volatilestate', no shutdown. Rejects with why not
   *  (it stopped orderly instead, or did not answer). */
  suspend(): Promise<void>;
}

export interface VtpmdRunOptions {
  runDir: string;
  qemuCtrl?: string;
  warm?: WarmVtpmd;
  groups: GroupHost;
  lastLog: (log: string) => string;
}

export async function startVtpmd(rec: InstanceRecord, o: VtpmdRunOptions): Promise<VtpmdRun> {
  const group = typeof rec.meta.group === 'string' ? rec.meta.group : undefined;
  return group && !o.qemuCtrl ? member(rec, group, o.groups) : ownProcess(rec, o);
}

async function ownProcess(rec: InstanceRecord, o: VtpmdRunOptions): Promise<VtpmdRun> {
  const log = join(o.runDir, rec.name, 'vtpmd.log');
  const guestArgs = o.qemuCtrl ? ['--qemu', o.qemuCtrl] : [];
  const d =
    o.warm?.daemon ??
    (await startDaemon(builtScript('vtpmd/main'), ['--dir', o.runDir, '--name', rec.name, '--tpm', rec.tpm, ...guestArgs, '--uuid', rec.uuid, '--state-link'], {
      log,
      timeoutMs: START_TIMEOUT_MS,
      stdin: true,
    }));
  const said = () => o.lastLog(log);
  return {
    domid: Number(d.info.domid),
    pid: d.pid,
    owned: true,
    async link(manager, peer) {
      // Over stdin: a QEMU guest's export key never goes on a command line (world-readable).
      // A warm vtpmd knows the manager already (its state link is connected): its instance.
      d.stdin!.end(o.warm ? `${rec.name} ${rec.tpm} ${rec.uuid} ${peer}\n` : `${manager} ${peer}\n`);
    },
    dead: () => (alive(d.pid) ? undefined : `vtpmd for ${rec.name} exited: ${said()}`),
    died: d.exited.then((e) => `vtpmd exited (${e.signal ?? `code ${e.code}`})`),
    stop: async () => void (await stopProcess(d.pid, 15_000)),
    async suspend() {
      const exit = d.exited;
      if (alive(d.pid)) process.kill(d.pid, 'SIGUSR1');
      const how = await Promise.race([exit, new Promise<undefined>((res) => setTimeout(() => res(undefined), 15_000).unref())]);
      if (!how) await stopProcess(d.pid);
      if (how?.code === EXIT_OK) return;
      const what = !how ? 'did not suspend within 15 s (stopped)' : how.code === SUSPEND_FAILED ? 'could not store its state and stopped orderly instead' : `exited (${how.signal ?? `code ${how.code}`})`;
      throw new VtpmError('ESTATE', `vtpmd for ${rec.name} ${what}: ${said()}`);
    },
  };
}

async function member(rec: InstanceRecord, group: string, groups: GroupHost): Promise<VtpmdRun> {
  const rg = await groups.ready(group);
  const { domid } = await rg.g.add({ name: rec.name, tpm: rec.tpm, uuid: rec.uuid });
  let gone: string | undefined;
  const died = rg.gone.then((how) => (gone = `vtpmd group ${group} ${how}`));
  let ended = false;
  const leave = async (fn: () => Promise<unknown>) => {
    if (ended || gone) return;
    ended = true;
    await fn();
  };
  return {
    domid,
    pid: rg.g.pid,
    owned: false,
    async link(manager, _peer, front) {
      await rg.g.link({ name: rec.name, manager, front: front! });
    },
    dead: () => (gone ? `vtpmd group ${group} of ${rec.name} ${gone}` : undefined),
    died,
    stop: () => leave(() => rg.g.stop(rec.name)),
    suspend: () => leave(() => rg.g.suspend(rec.name)),
  };
}
