// One host's protected state as the manager holds it: the hardware TPM, the root key it
// releases, the instance table, and the rollback counter that anchors the table's epoch.
//
// A new epoch at each start, table change (create, destroy) and clean stop, never per guest
// command (a real TPM's NV wears and rate-limits writes). Start: open the hardware; unseal
// the root key (or, on a first start with an empty state dir, create and seal one); then
// the table's epoch protocol (manager/store/table.ts startEpoch: the table must be at the
// counter's epoch, or one above when a crash interrupted the last bump). Any refusal
// before the table write leaves every file as it was.
import { randomUUID } from 'node:crypto';
import { VtpmError } from '../drivers/base/errors.ts';
import { CommandQueue } from '../drivers/tpm/serial.ts';
import { builtScript } from '../drivers/base/modules.ts';
import { openHardware } from '../drivers/hwtpm/open.ts';
import { ensureAuthority } from '../drivers/xen/authority-launch.ts';
import { WarmPool } from './warm-pool.ts';
import { FrontendHost } from './front-host.ts';
import { GroupHost } from './group-host.ts';
import { Domain } from '../drivers/xen/domain.ts';
import { leftBehind } from './launch.ts';
import { StateThread } from './state-thread.ts';
import { Supervisor } from './supervisor.ts';
import type { HardwareTpm } from '../drivers/tpm/transport.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import type { GuestKind, RunPieces } from './launch.ts';
import { openCounter, type MonotonicCounter } from './hardware/counter.ts';
import { rootKeyFor } from './host-root-key.ts';
import { removeInstanceDir } from './store/blob-store.ts';
import { prepareDir } from './store/sealed-file.ts';
import { newKey } from './store/crypto.ts';
import { commitTable, startEpoch, type InstanceRecord, type Table } from './store/table.ts';
import { HostIdentity } from './migration/identity.ts';
import { TrustList } from './migration/trust.ts';
import { MigrationService } from './migration/service.ts';
import type { MigrationHost } from './migration/host-access.ts';
import { Attestation } from './attest/service.ts';


export interface HostOptions {
  stateDir: string;
  runDir: string;
  /** tis:DIR (the emulated chip, NVRAM in DIR: outside the state dir) or device:PATH. */
  hw: string;
  /** PCRs a new root key is sealed to (default 0,2,4,7); an existing key keeps its own. */
  pcrs?: number[];
  /** ADDR:PORT to take migrations on (none: this host only sends them). */
  migrationListen?: string;
  /** vtpmd processes kept started for the next starts (0: none; the daemon's default is
   *  control.ts' DEFAULT_WARM). */
  warm: number;
  log: (line: string) => void;
}

export interface InstanceInfo {
  name: string;
  uuid: string;
  tpm: TpmVersion;
  /** ISO time of creation. */
  created: string;
  /** The vtpmd group its engine runs in (created with --group). */
  group?: string;
  state: 'running' | 'restarting' | 'failed' | 'stopped' | 'suspended' | 'migrating';
  /** The tpm0 node while running (or restarting). */
  node?: string;
  /** Why it is restarting or failed. */
  reason?: string;
  restarts?: number;
  /** While running (or restarting): the front end's kind, and the current run's pieces. */
  fuse?: GuestKind;
  vtpmd?: RunPieces['vtpmd'];
  front?: RunPieces['front'];
}


/** Instances stopped at once by a host stop. */
const STOP_PARALLEL = 16;

export class Host {
  private stopping: Promise<void> | null = null;
  /** Table changes one at a time: each is built from the table the previous one left. */
  private readonly changes = new CommandQueue();
  private readonly stoppedCbs: ((code: number) => void)[] = [];

  private readonly instances: Supervisor;
  readonly migration: MigrationService;
  private readonly warm: WarmPool;
  private readonly frontd: FrontendHost;
  private readonly groups: GroupHost;

  private constructor(
    private readonly o: HostOptions,
    private readonly hw: HardwareTpm,
    private readonly rootKey: Uint8Array,
    private readonly counter: MonotonicCounter,
    private table: Table,
    readonly pcrs: number[],
    private domain: Domain,
    identity: HostIdentity,
    private readonly attest: Attestation,
  ) {
    this.warm = new WarmPool({ runDir: o.runDir, size: o.warm, log: o.log, domain: () => this.domain });
    this.frontd = new FrontendHost({ runDir: o.runDir, log: o.log });
    this.groups = new GroupHost({ runDir: o.runDir, log: o.log });
    this.instances = new Supervisor(
      {
        warm: () => this.warm.take(),
        refill: () => this.warm.fill(),
        frontd: this.frontd,
        groups: this.groups,
        runDir: o.runDir,
        stateDir: o.stateDir,
        log: o.log,
        // Each committed blob version is recorded with the next table write.
        onVersions: (uuid, blobs) => {
          this.table = { ...this.table, instances: this.table.instances.map((i) => (i.uuid === uuid ? { ...i, blobs } : i)) };
        },
      },
      domain,
    );
    this.migration = new MigrationService(this.migrationAccess(identity, TrustList.open(o.stateDir, rootKey)));
    this.watchAuthority();
  }

  /** What migration may do to this host: table changes through the same queue and epoch
   *  protocol as every other change, runs through the supervisor. */
  private migrationAccess(identity: HostIdentity, trust: TrustList): MigrationHost {
    return {
      identity,
      trust,
      stateDir: this.o.stateDir,
      log: this.o.log,
      exclusive: (fn) => this.changes.run(fn),
      allRecords: () => this.table.instances,
      record: (by) => this.table.instances.find((i) => (by.uuid !== undefined ? i.uuid === by.uuid : i.name === by.name)),
      addRecord: (rec) => this.commit({ ...this.table, instances: [...this.table.instances, rec] }),
      patchRecord: (uuid, patch) => this.commit(withRecord(this.table, uuid, patch)),
      dropRecord: async (uuid) => {
        await this.commit({ ...this.table, instances: this.table.instances.filter((i) => i.uuid !== uuid) });
        removeInstanceDir(this.o.stateDir, uuid);
      },
      quiesce: async (name) => {
        if (this.instances.status(name)) await this.suspendLocked(name);
      },
      startRun: (name) => this.instances.start(this.find(name)),
      stopRun: async (name) => {
        if (!this.instances.status(name)) return;
        const blobs = await this.instances.stop(name);
        this.table = withRecord(this.table, this.find(name).uuid, { blobs });
      },
      scheduleSettle: (uuid) => this.migration.scheduleSettle(uuid),
    };
  }

  /** The authority (the hypervisor role) died: every domain went with it, so every run
   *  is restarting. Start a new one and join it; the supervisor relaunches onto it. */
  private watchAuthority(): void {
    this.domain.onLost(() => {
      if (this.stopping) return;
      this.o.log('the authority went away: starting a new one');
      void (async () => {
        for (let delay = 200; !this.stopping; delay = Math.min(delay * 2, 10_000)) {
          try {
            await ensureAuthority(this.o.runDir, builtScript('drivers/xen/authority'));
            this.domain = await Domain.join(this.o.runDir, { host: true, name: 'manager' });
            this.instances.setDomain(this.domain);
            this.watchAuthority();
            await this.warm.renew();
            this.o.log(`rejoined a new authority as domain ${this.domain.domid}`);
            return;
          } catch (e) {
            this.o.log(`restarting the authority failed: ${(e as Error).message}; next try in ${delay} ms`);
            await new Promise((r) => setTimeout(r, delay));
          }
        }
      })();
    });
  }

  static async open(o: HostOptions): Promise<Host> {
    prepareDir(o.stateDir);
    prepareDir(o.runDir);
    const hw = await openHardware(o.hw);
    try {
      const { rootKey, pcrs, created } = await rootKeyFor(hw, o);
      const counter = await openCounter(hw);
      // A first start (new root key) begins a table at whatever the counter holds.
      const { table, bumpPending } = await startEpoch(o.stateDir, rootKey, counter, { fresh: created });
      if (bumpPending) o.log('the last epoch change was interrupted by a crash: finished it');
      // dom0 of the host: the authority (the hypervisor role) is started if none runs.
      await ensureAuthority(o.runDir, builtScript('drivers/xen/authority'));
      const identity = await HostIdentity.open(hw, o.stateDir, rootKey, o.log);
      const attest = await Attestation.open(hw, { stateDir: o.stateDir, runDir: o.runDir, rootKey, log: o.log });
      const domain = await Domain.join(o.runDir, { host: true, name: 'manager' });
      const host = new Host(o, hw, rootKey, counter, table, pcrs, domain, identity, attest);
      await host.migration.recover();
      // Instances a crashed manager left running come back by themselves.
      for (const rec of host.table.instances) {
        const left = leftBehind(o.runDir, rec.name);
        if (left && !rec.meta.migration) host.instances.relaunch(rec, left.fuse);
      }
      if (o.migrationListen) await host.migration.listen(o.migrationListen);
      host.warm.fill();
      await host.frontd.ready();
      return host;
    } catch (e) {
      await hw.close().catch(() => undefined);
      throw e;
    }
  }

  /** `next` becomes the table, in a new epoch (written, then the counter bumped). */
  private async commit(next: Table): Promise<void> {
    await commitTable(this.o.stateDir, this.rootKey, next, this.counter);
    this.table = next;
  }

  status(): { pid: number; epoch: number; hardware: string; instances: number; pcrs: number[]; stateDir: string; runDir: string; warm: { size: number; pids: number[] } } {
    return { pid: process.pid, epoch: this.table.epoch, hardware: this.hw.description, instances: this.table.instances.length, pcrs: this.pcrs, stateDir: this.o.stateDir, runDir: this.o.runDir, warm: { size: this.warm.size, pids: this.warm.pids } };
  }

  list(): InstanceInfo[] {
    return this.table.instances.map((i) => {
      const st = this.instances.status(i.name);
      const base = { name: i.name, uuid: i.uuid, tpm: i.tpm, created: new Date(i.created).toISOString(), ...(typeof i.meta.group === 'string' ? { group: i.meta.group } : {}) };
      if (st) return { ...base, ...st };
      if (i.meta.migration === 'out') return { ...base, state: 'migrating' as const, reason: `to ${String(i.meta.migrationTo)}, outcome not yet known` };
      return { ...base, state: i.meta.suspended === true ? ('suspended' as const) : ('stopped' as const) };
    });
  }

  /** Launch the instance's vtpmd and tpm0 node (a `fuse` front end); resolves once the node answers. */
  start(name: string, fuse: GuestKind = 'raw'): Promise<{ name: string; node: string }> {
    return this.changes.run(async () => {
      const rec = this.usable(name);
      if (rec.meta.suspended === true) throw new VtpmError('EBUSY', `instance ${name} is suspended: vtpm resume ${name} starts it where it stopped`);
      return { name, node: await this.instances.start(rec, fuse) };
    });
  }

  /** Suspend the instance: its whole running TPM goes to the store and it stops; the
   *  table records it as suspended (only `resume` starts it again). */
  suspend(name: string): Promise<{ name: string }> {
    return this.changes.run(() => this.suspendLocked(name));
  }

  private async suspendLocked(name: string): Promise<{ name: string }> {
    const rec = this.find(name);
    let blobs: Record<string, number>;
    try {
      blobs = await this.instances.suspend(name);
    } catch (e) {
      const v = (e as { versions?: Record<string, number> }).versions;
      if (v) await this.commit(withRecord(this.table, rec.uuid, { blobs: v }));
      throw e;
    }
    await this.commit(withRecord(this.table, rec.uuid, { blobs, meta: { ...rec.meta, suspended: true } }));
    return { name };
  }

  /** Start a suspended instance where it was suspended (PCRs, sessions, loaded objects). */
  resume(name: string, fuse: GuestKind = 'raw'): Promise<{ name: string; node: string }> {
    return this.changes.run(async () => {
      const rec = this.usable(name);
      if (rec.meta.suspended !== true) throw new VtpmError('EINVAL', `instance ${name} is not suspended (vtpm start ${name} starts it)`);
      const node = await this.instances.start(rec, fuse);
      // The engine consumed the volatile state at power-on: from here it runs as any other.
      const { suspended: _, ...meta } = this.find(name).meta;
      await this.commit(withRecord(this.table, rec.uuid, { meta }));
      return { name, node };
    });
  }

  /** Stop the instance (an orderly TPM shutdown) and record its state's versions. */
  stopInstance(name: string): Promise<{ name: string }> {
    return this.changes.run(async () => {
      this.find(name);
      const blobs = await this.instances.stop(name);
      const uuid = this.find(name).uuid;
      await this.commit(withRecord(this.table, uuid, { blobs }));
      return { name };
    });
  }

  /** The record of an instance this host may run or change now (not locked by a migration). */
  private usable(name: string): InstanceRecord {
    const rec = this.find(name);
    if (rec.meta.migration === 'out') throw new VtpmError('EBUSY', `instance ${name} is migrating to ${String(rec.meta.migrationTo)}: the manager settles it with that host first (vtpm list)`);
    if (rec.meta.migration === 'in') throw new VtpmError('EBUSY', `instance ${name} is still arriving by migration`);
    return rec;
  }

  private find(name: string): InstanceRecord {
    const rec = this.table.instances.find((i) => i.name === name);
    if (!rec) throw new VtpmError('ENOENT', `no instance ${name} on this host (vtpm list shows them)`);
    return rec;
  }

  /** A new instance, bound for life to the guest `name`. */
  create(name: string, tpm: TpmVersion, group?: string): Promise<{ name: string; uuid: string; tpm: TpmVersion; group?: string }> {
    return this.changes.run(async () => {
      if (this.table.instances.some((i) => i.name === name)) throw new VtpmError('EBUSY', `instance ${name} already exists`);
      // --group: its engine runs in that group's vtpmd process (for life, like its name).
      const rec: InstanceRecord = { uuid: randomUUID(), name, tpm, key: newKey(), created: Date.now(), blobs: {}, meta: group ? { group } : {} };
      await this.commit({ ...this.table, instances: [...this.table.instances, rec] });
      // Endorsed as a TPM maker would before handing it out (manager/attest); a failure undoes the create.
      const run = { start: () => this.instances.start(rec, 'raw'), stop: async () => void (await this.commit(withRecord(this.table, rec.uuid, { blobs: await this.instances.stop(name) }))) };
      await this.attest.provision(rec, run).catch(async (e) => {
        await this.commit({ ...this.table, instances: this.table.instances.filter((i) => i.uuid !== rec.uuid) });
        removeInstanceDir(this.o.stateDir, rec.uuid);
        throw e;
      });
      this.o.log(`created instance ${name} (${rec.uuid}, TPM ${tpm}${group ? `, group ${group}` : ''})`);
      return { name, uuid: rec.uuid, tpm, ...(group ? { group } : {}) };
    });
  }

  /** Drop the instance's key from the table first (its blobs are useless from then on),
   *  then remove its files. */
  destroy(name: string): Promise<{ name: string; uuid: string }> {
    return this.changes.run(async () => {
      const rec = this.usable(name);
      if (this.instances.status(name)) throw new VtpmError('EBUSY', `instance ${name} is running: vtpm stop ${name} first`);
      await this.commit({ ...this.table, instances: this.table.instances.filter((i) => i !== rec) });
      removeInstanceDir(this.o.stateDir, rec.uuid);
      this.attest.remove(rec.uuid);
      this.o.log(`destroyed instance ${name} (${rec.uuid})`);
      return { name, uuid: rec.uuid };
    });
  }

  /** Run `fn` on the host's attestation, in turn with every other hardware-TPM use. */
  attestation<T>(fn: (a: Attestation) => T | Promise<T>): Promise<T> {
    return this.changes.run(async () => fn(this.attest));
  }

  /** Called once the host has stopped, with the exit code it suggests (1: the clean-stop
   *  epoch could not be recorded). */
  onStopped(cb: (code: number) => void): void {
    this.stoppedCbs.push(cb);
  }

  /** Clean stop: a new epoch (so a copy of the state dir taken while running is stale),
   *  then release the hardware TPM. */
  stop(why: string): Promise<void> {
    return (this.stopping ??= (async () => {
      this.o.log(`stopping (${why})`);
      await this.migration.stop();
      await this.warm.close();
      let code = 0;
      // Several at a time: each is an orderly TPM shutdown and a few stores, mostly waiting;
      // one after the other, 500 instances took minutes.
      const names = this.instances.names;
      await this.changes.run(async () => {
        const worker = async () => {
          for (let name = names.shift(); name !== undefined; name = names.shift()) {
            const n = name;
            await this.instances.stop(n).then(
              (blobs) => (this.table = { ...this.table, instances: this.table.instances.map((i) => (i.name === n ? { ...i, blobs } : i)) }),
              (e) => {
                code = 1;
                this.o.log(`stopping instance ${n}: ${(e as Error).message}`);
              },
            );
          }
        };
        await Promise.all(Array.from({ length: STOP_PARALLEL }, worker));
      });
      try {
        await this.changes.run(() => this.commit(this.table));
      } catch (e) {
        code = 1;
        this.o.log(`the clean-stop epoch was not recorded: ${(e as Error).message}`);
      }
      await this.groups.close().catch((e) => this.o.log(`stopping the vtpmd groups: ${(e as Error).message}`));
      await this.frontd.close().catch((e) => this.o.log(`stopping the front-end process: ${(e as Error).message}`));
      await StateThread.stop(this.domain);
      await this.domain.leave().catch(() => undefined);
      this.attest.close();
      await this.hw.close().catch((e) => this.o.log(`closing the hardware TPM: ${(e as Error).message}`));
      for (const cb of this.stoppedCbs) cb(code);
    })());
  }
}

/** The table with one instance's record changed. */
function withRecord(table: Table, uuid: string, patch: Partial<InstanceRecord>): Table {
  return { ...table, instances: table.instances.map((i) => (i.uuid === uuid ? { ...i, ...patch } : i)) };
}
