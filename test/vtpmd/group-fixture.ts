// Test fixture for the grouped vtpmd: an authority, the manager's side of the state links
// (state-server.ts), the group process itself (the built vtpmd, as the manager runs it),
// and guests: real tpmfront processes with their tpm0 nodes, or front ends in this process.
import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { builtScript, ensureBuilt } from '../../drivers/base/modules.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon } from '../../drivers/host/daemon.ts';
import type { TpmVersion } from '../../drivers/tpm/engine.ts';
import { detach } from '../../drivers/tpmfront/mountpoint.ts';
import { waitNodeAnswers } from '../../drivers/tpmfront/probe.ts';
import { XenbusFront, type FrontLink } from '../../drivers/tpmfront/xenbus-front.ts';
import { startAuthority } from '../../drivers/xen/authority-launch.ts';
import { Domain } from '../../drivers/xen/domain.ts';
import { VtpmdGroup } from '../../vtpmd/group-client.ts';
import { StateServer } from './state-server.ts';

export interface NodeGuest {
  name: string;
  uuid: string;
  domid: number;
  node: string;
  front: StartedDaemon;
  thread: number;
}

export interface LocalGuest {
  name: string;
  uuid: string;
  domid: number;
  link: FrontLink;
  thread: number;
  close(): Promise<void>;
}

export async function groupFixture(o: { threads?: number } = {}) {
  await ensureBuilt();
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-group-'));
  const auth = await startAuthority(dir);
  const manager = await StateServer.start(dir, dir);
  const log = join(dir, 'group.log');
  let group = await VtpmdGroup.start({ dir, group: 'g0', log, ...(o.threads ? { threads: o.threads } : {}) });
  const fronts: { name: string; d: StartedDaemon }[] = [];
  const locals: Domain[] = [];

  /** add + the manager's back end + link: the member's TPM up, waiting for `front`. */
  async function member(name: string, tpm: TpmVersion, uuid: string, front: number) {
    const { domid } = await group.add({ name, tpm, uuid });
    await manager.open(domid, uuid);
    const { thread } = await group.link({ name, manager: manager.domid, front });
    return { domid, thread };
  }

  return {
    dir,
    manager,
    get group() {
      return group;
    },
    log: () => readFileSync(log, 'utf8'),
    /** A new group process (after the last one died). */
    async restartGroup() {
      group = await VtpmdGroup.start({ dir, group: 'g0', log, ...(o.threads ? { threads: o.threads } : {}) });
    },
    /** A member whose guest is a real tpmfront process: resolves once its node answers. */
    async nodeGuest(name: string, tpm: TpmVersion = '2.0', uuid: string = randomUUID()): Promise<NodeGuest> {
      const front = await startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', dir, '--name', name, '--fuse', 'raw'], { log: join(dir, `front-${name}.log`), stdin: true });
      fronts.push({ name, d: front });
      const m = await member(name, tpm, uuid, Number(front.info.domid));
      front.stdin!.end(`${m.domid}\n`);
      const node = join(dir, name, 'dev', 'tpm0');
      await waitNodeAnswers(node, tpm, 30_000, () => (alive(front.pid) ? undefined : `tpmfront ${name} exited`));
      return { name, uuid, domid: m.domid, node, front, thread: m.thread };
    },
    /** A member whose guest front end lives in this process (commands with link.front.send). */
    async localGuest(name: string, tpm: TpmVersion = '2.0', uuid: string = randomUUID()): Promise<LocalGuest> {
      const dom = await Domain.join(dir, { name: `guest-${name}` });
      locals.push(dom);
      const m = await member(name, tpm, uuid, dom.domid);
      const xf = await XenbusFront.start(dom, { backendId: m.domid, reconnect: false });
      const link = await xf.connected(30_000);
      return { name, uuid, domid: m.domid, link, thread: m.thread, close: () => xf.close(2000).catch(() => {}) };
    },
    async stopFront(g: NodeGuest) {
      await stopProcess(g.front.pid);
    },
    async done() {
      await group.shutdown().catch(() => {});
      for (const f of fronts) {
        await stopProcess(f.d.pid).catch(() => {});
        detach(join(dir, f.name, 'dev')); // a front end killed with SIGKILL leaves its mount
      }
      for (const d of locals) await d.leave().catch(() => {});
      await manager.stop().catch(() => {});
      await auth.stop();
      if (!process.env.GROUP_KEEP) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A process's PSS and its anonymous (private) part, in kB (/proc/PID/smaps_rollup). The
 *  rest of PSS is mostly node's own text, shared with every other node process on the host
 *  (so it varies with how many run). */
export function memoryKb(pid: number): { pss: number; anon: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const field = (name: string) => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text);
    if (!m) throw new Error(`no ${name} line for ${pid}`);
    return Number(m[1]);
  };
  return { pss: field('Pss'), anon: field('Anonymous') };
}
