// Running instances: for each, a guest front end (the tpm0 node), a vtpmd, and the
// manager's back end of the vtpmd's state link with its serving thread (state-worker.ts).
//
// Start order (each piece waits for the one before, as Xen's toolstack wires a vTPM):
// the guest's tpmfront joins (its domid is vtpmd's peer); vtpmd joins and reports its
// domid; the manager opens the state back end for that domid and hands vtpmd its own
// domid on stdin; vtpmd connects, boots the TPM from the state the manager serves, and
// publishes the guest back end; tpmfront learns vtpmd's domid and connects; the node is
// handed out once a GetRandom through it answers. Stop: front end, then vtpmd (an orderly
// TPM shutdown whose last stores still reach the manager), then the state link.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { VtpmError } from '../drivers/base/errors.ts';
import { builtScript, sibling, startWorker } from '../drivers/base/modules.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon } from '../drivers/host/daemon.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { XenbusBack } from '../drivers/tpmback/xenbus-back.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { detach } from '../drivers/tpmfront/mountpoint.ts';
import { waitNodeAnswers } from '../drivers/tpmfront/probe.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { StateWorkerData, StateWorkerEvent } from './state-worker.ts';
import type { InstanceRecord } from './store/table.ts';

const START_TIMEOUT_MS = 30_000;

export interface RunningInfo {
  name: string;
  node: string;
  vtpmd: { pid: number; domid: number };
  front: { pid: number; domid: number };
  started: string;
}

interface Running extends RunningInfo {
  back: XenbusBack;
  worker: Worker;
  ended: Promise<Record<string, number>>;
}

export class Instances {
  private readonly running = new Map<string, Running>();

  constructor(
    private readonly o: { runDir: string; stateDir: string; domain: Domain; log: (line: string) => void; onVersions: (uuid: string, v: Record<string, number>) => void },
  ) {}

  info(name: string): RunningInfo | undefined {
    const r = this.running.get(name);
    return r && { name: r.name, node: r.node, vtpmd: r.vtpmd, front: r.front, started: r.started };
  }

  get names(): string[] {
    return [...this.running.keys()];
  }

  async start(rec: InstanceRecord): Promise<RunningInfo> {
    if (this.running.has(rec.name)) throw new VtpmError('EBUSY', `instance ${rec.name} is already running (node ${this.running.get(rec.name)!.node})`);
    const gdir = join(this.o.runDir, rec.name);
    mkdirSync(join(gdir, 'dev'), { recursive: true, mode: 0o700 });
    detach(join(gdir, 'dev')); // a front end killed earlier leaves a dead mount behind
    const started: StartedDaemon[] = [];
    let back: XenbusBack | undefined;
    try {
      const front = await startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', this.o.runDir, '--name', rec.name], {
        log: join(gdir, 'front.log'),
        timeoutMs: START_TIMEOUT_MS,
        stdin: true,
      });
      started.push(front);
      const vtpmd = await startDaemon(
        builtScript('vtpmd/main'),
        ['--dir', this.o.runDir, '--name', rec.name, '--tpm', rec.tpm, '--front', String(front.info.domid), '--uuid', rec.uuid, '--state-link'],
        { log: join(gdir, 'vtpmd.log'), timeoutMs: START_TIMEOUT_MS, stdin: true },
      );
      started.push(vtpmd);
      const vtpmdDomid = Number(vtpmd.info.domid);
      back = await XenbusBack.start(this.o.domain, { frontId: vtpmdDomid, uuid: rec.uuid });
      const linked = back.connected(START_TIMEOUT_MS);
      vtpmd.stdin!.end(`${this.o.domain.domid}\n`);
      const link = await linked;
      const worker = startWorker(sibling(import.meta.url, './state-worker'), {
        workerData: { params: link.params, stateDir: this.o.stateDir, uuid: rec.uuid, name: rec.name, key: rec.key, minVersions: rec.blobs } satisfies StateWorkerData,
      });
      const ended = new Promise<Record<string, number>>((resolve) => {
        let last = rec.blobs;
        worker.on('message', (m: StateWorkerEvent) => {
          last = m.versions;
          this.o.onVersions(rec.uuid, m.versions);
          if (m.ev === 'ended') this.o.log(`instance ${rec.name}: state link ended (${m.why})`);
        });
        worker.once('error', (e) => this.o.log(`instance ${rec.name}: state thread crashed: ${e.message}`));
        worker.once('exit', () => resolve(last));
      });
      const b = back;
      b.onDisconnect(() => TpmifBack.stopFrom(link.params));
      front.stdin!.end(`${vtpmdDomid}\n`);
      const node = join(gdir, 'dev', 'tpm0');
      await waitNodeAnswers(node, rec.tpm as TpmVersion, START_TIMEOUT_MS, () => {
        if (!alive(front.pid)) return `tpmfront for ${rec.name} exited (see ${join(gdir, 'front.log')})`;
        if (!alive(vtpmd.pid)) return `vtpmd for ${rec.name} exited (see ${join(gdir, 'vtpmd.log')})`;
        return undefined;
      }).catch(async (e) => {
        TpmifBack.stopFrom(link.params);
        await ended;
        throw e;
      });
      const r: Running = {
        name: rec.name,
        node,
        front: { pid: front.pid, domid: Number(front.info.domid) },
        vtpmd: { pid: vtpmd.pid, domid: vtpmdDomid },
        started: new Date().toISOString(),
        back: b,
        worker,
        ended,
      };
      this.running.set(rec.name, r);
      this.o.log(`instance ${rec.name} running: node ${node}, vtpmd domain ${vtpmdDomid}, guest domain ${r.front.domid}`);
      return this.info(rec.name)!;
    } catch (e) {
      for (const d of started.reverse()) await stopProcess(d.pid);
      await back?.close().catch(() => undefined);
      detach(join(gdir, 'dev'));
      throw e;
    }
  }

  /** Stop one instance; resolves with the blob versions its state link last committed. */
  async stop(name: string): Promise<Record<string, number>> {
    const r = this.running.get(name);
    if (!r) throw new VtpmError('ENOENT', `instance ${name} is not running`);
    this.running.delete(name);
    await stopProcess(r.front.pid);
    await stopProcess(r.vtpmd.pid, 15_000); // its orderly shutdown still stores through the link
    detach(join(this.o.runDir, name, 'dev'));
    await r.back.close().catch((e) => this.o.log(`instance ${name}: closing the state link: ${(e as Error).message}`));
    const versions = await Promise.race([r.ended, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5000).unref())]);
    if (!versions) {
      await r.worker.terminate();
      throw new VtpmError('ETIMEDOUT', `the state link of ${name} did not end within 5 s`);
    }
    this.o.log(`instance ${name} stopped`);
    return versions;
  }
}
