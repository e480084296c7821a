// The instances this manager runs, kept running: a run whose vtpmd or front end dies is
// torn down and launched again (its state is the manager's, so nothing is lost but what
// was never acknowledged), with a backoff that grows on repeated failures and resets once
// a run has lasted a minute. `vtpm list` shows running / restarting / failed and why.
import { VtpmError } from '../drivers/base/errors.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { WarmVtpmd } from './warm-pool.ts';
import type { FrontendHost } from './front-host.ts';
import type { GroupHost } from './group-host.ts';
import { launch, type GuestKind, type Run, type RunPieces } from './launch.ts';
import type { InstanceRecord } from './store/table.ts';

const FIRST_BACKOFF_MS = 500;
const MAX_BACKOFF_MS = 30_000;
const HEALTHY_MS = 60_000;
/** Consecutive failed launches before a restart is given up (`vtpm start` tries again). */
const MAX_ATTEMPTS = 8;

export type RunState = 'running' | 'restarting' | 'failed';

export interface InstanceStatus {
  state: RunState;
  node: string;
  /** Why it is restarting or failed, and the last crash of a running one. */
  reason?: string;
  restarts: number;
  /** The front end's kind (every relaunch uses the same). */
  fuse: GuestKind;
  /** The pieces of the current run (while one is up). */
  vtpmd?: RunPieces['vtpmd'];
  front?: RunPieces['front'];
}

interface Slot {
  rec: InstanceRecord;
  fuse: GuestKind;
  run?: Run;
  state: RunState;
  reason?: string;
  restarts: number;
  failures: number;
  since: number;
  stopping: boolean;
  timer?: NodeJS.Timeout;
  node: string;
  /** A launch, or a crashed run's teardown, in flight: a stop waits for it (a launch then
   *  stops what it started), so no process of the instance outlives a stop, nor the manager. */
  busy?: Promise<void>;
}

export interface SupervisorOptions {
  runDir: string;
  stateDir: string;
  log: (line: string) => void;
  onVersions: (uuid: string, v: Record<string, number>) => void;
  /** A waiting vtpmd of the warm pool, if any; and the pool's refill, once a start is done. */
  warm?: () => WarmVtpmd | undefined;
  refill?: () => void;
  /** The host's front-end process. */
  frontd: FrontendHost;
  /** The host's grouped vtpmd processes. */
  groups: GroupHost;
}

export class Supervisor {
  private readonly slots = new Map<string, Slot>();
  private domain: Domain;

  constructor(
    private readonly o: SupervisorOptions,
    domain: Domain,
  ) {
    this.domain = domain;
  }

  /** A new connection to the authority (the old one was lost): later launches use it. */
  setDomain(d: Domain): void {
    this.domain = d;
  }

  status(name: string): InstanceStatus | undefined {
    const s = this.slots.get(name);
    if (!s) return undefined;
    const pieces = s.run ? { vtpmd: s.run.vtpmd, front: s.run.front } : {};
    return { state: s.state, node: s.node, restarts: s.restarts, fuse: s.fuse, ...pieces, ...(s.reason ? { reason: s.reason } : {}) };
  }

  get names(): string[] {
    return [...this.slots.keys()];
  }

  /** First launch (`vtpm start`): its failure is the caller's error, nothing is retried. */
  async start(rec: InstanceRecord, fuse: GuestKind = 'raw'): Promise<string> {
    const had = this.slots.get(rec.name);
    if (had && had.state !== 'failed') throw new VtpmError('EBUSY', `instance ${rec.name} is already ${had.state} (node ${had.node})`);
    if (had) this.slots.delete(rec.name);
    const slot: Slot = { rec, fuse, state: 'restarting', restarts: 0, failures: 0, since: Date.now(), stopping: false, node: '' };
    this.slots.set(rec.name, slot);
    try {
      await this.runOnce(slot);
    } catch (e) {
      this.slots.delete(rec.name);
      throw e;
    }
    return slot.node;
  }

  /** An instance that was running when the last manager died: launched again in the
   *  background, retried with backoff like a crashed run. */
  relaunch(rec: InstanceRecord, fuse: GuestKind = 'raw'): void {
    if (this.slots.has(rec.name)) return;
    const slot: Slot = { rec, fuse, state: 'restarting', reason: 'it was running when the previous manager stopped unexpectedly', restarts: 0, failures: 0, since: Date.now(), stopping: false, node: '' };
    this.slots.set(rec.name, slot);
    this.retry(slot, 0);
  }

  private runOnce(slot: Slot): Promise<void> {
    return this.busyWith(slot, this.launchOnce(slot));
  }

  private busyWith(slot: Slot, p: Promise<void>): Promise<void> {
    slot.busy = p;
    const clear = () => {
      if (slot.busy === p) slot.busy = undefined;
    };
    p.then(clear, clear);
    return p;
  }

  private async launchOnce(slot: Slot): Promise<void> {
    const run = await launch(slot.rec, {
      runDir: this.o.runDir,
      stateDir: this.o.stateDir,
      domain: this.domain,
      fuse: slot.fuse,
      log: this.o.log,
      ...(this.o.warm ? { warm: this.o.warm } : {}),
      frontd: this.o.frontd,
      groups: this.o.groups,
      onVersions: (v) => {
        slot.rec = { ...slot.rec, blobs: v };
        this.o.onVersions(slot.rec.uuid, v);
      },
    }).finally(() => this.o.refill?.());
    if (slot.stopping) {
      await run.stop().catch(() => undefined);
      return;
    }
    slot.run = run;
    slot.node = run.node;
    slot.state = 'running';
    slot.since = Date.now();
    slot.failures = 0;
    const guest = run.front ? `node ${run.node} (${run.fuse} front end), guest domain ${run.front.domid}` : `QEMU control socket ${run.node}`;
    this.o.log(`instance ${slot.rec.name} running: ${guest}, vtpmd domain ${run.vtpmd.domid}`);
    void run.died.then((why) => this.crashed(slot, run, why));
  }

  private async crashed(slot: Slot, run: Run, why: string): Promise<void> {
    if (slot.stopping || slot.run !== run) return;
    slot.run = undefined;
    slot.state = 'restarting';
    slot.reason = `${why} at ${new Date().toISOString()}`;
    if (Date.now() - slot.since > HEALTHY_MS) slot.failures = 0;
    this.o.log(`instance ${slot.rec.name}: ${why}; restarting it`);
    await this.busyWith(slot, run.stop().then(
      () => undefined,
      (e) => this.o.log(`instance ${slot.rec.name}: clearing the crashed run: ${(e as Error).message}`),
    ));
    this.retry(slot);
  }

  private retry(slot: Slot, firstDelay?: number): void {
    if (slot.stopping) return;
    if (slot.failures >= MAX_ATTEMPTS) {
      slot.state = 'failed';
      this.o.log(`instance ${slot.rec.name}: gave up after ${MAX_ATTEMPTS} failed restarts (${slot.reason}); vtpm start tries again`);
      return;
    }
    const delay = firstDelay ?? Math.min(MAX_BACKOFF_MS, FIRST_BACKOFF_MS * 2 ** slot.failures);
    slot.failures++;
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      this.runOnce(slot).then(
        () => {
          slot.restarts++;
        },
        (e) => {
          slot.reason = `restart failed: ${(e as Error).message}`;
          this.o.log(`instance ${slot.rec.name}: ${slot.reason}; next try in ${Math.min(MAX_BACKOFF_MS, FIRST_BACKOFF_MS * 2 ** slot.failures)} ms`);
          this.retry(slot);
        },
      );
    }, delay);
  }

  /** Suspend a running instance (its TPM's whole state to the store, no restart after);
   *  resolves with the committed versions. A failed suspend leaves it stopped orderly: the
   *  error carries the versions committed (`versions`). */
  async suspend(name: string): Promise<Record<string, number>> {
    const slot = this.slots.get(name);
    if (!slot) throw new VtpmError('ENOENT', `instance ${name} is not running`);
    if (!slot.run) throw new VtpmError('EBUSY', `instance ${name} is ${slot.state}${slot.reason ? ` (${slot.reason})` : ''}: only a running instance can be suspended`);
    slot.stopping = true;
    clearTimeout(slot.timer);
    this.slots.delete(name);
    const versions = await slot.run.suspend();
    this.o.log(`instance ${name} suspended`);
    return versions;
  }

  /** Stop an instance for good (no restart); resolves with its last committed versions. */
  async stop(name: string): Promise<Record<string, number>> {
    const slot = this.slots.get(name);
    if (!slot) throw new VtpmError('ENOENT', `instance ${name} is not running`);
    slot.stopping = true;
    clearTimeout(slot.timer);
    this.slots.delete(name);
    await slot.busy?.catch(() => undefined);
    const versions = slot.run ? await slot.run.stop() : slot.rec.blobs;
    this.o.log(`instance ${name} stopped`);
    return versions;
  }
}
