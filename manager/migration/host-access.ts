// What migration needs of the host (manager/host.ts implements it): the table, one change
// at a time, the instances' runs, and the host's identity and trusted hosts.
import type { InstanceRecord } from '../store/table.ts';
import type { HostIdentity } from './identity.ts';
import type { TrustList } from './trust.ts';

export interface MigrationHost {
  readonly identity: HostIdentity;
  readonly trust: TrustList;
  readonly stateDir: string;
  log(line: string): void;
  /** Run `fn` with the table (and the hardware TPM) to itself: changes one at a time. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  allRecords(): InstanceRecord[];
  /** The current record of an instance, by name or uuid. */
  record(by: { name?: string; uuid?: string }): InstanceRecord | undefined;
  /** In exclusive: commit the table with a new record. */
  addRecord(rec: InstanceRecord): Promise<void>;
  /** In exclusive: commit the table with the record changed. */
  patchRecord(uuid: string, patch: Partial<InstanceRecord>): Promise<void>;
  /** In exclusive: commit the table without the record, then remove its files. */
  dropRecord(uuid: string): Promise<void>;
  /** In exclusive: a running instance is suspended (committed); a stopped one stays so. */
  quiesce(name: string): Promise<void>;
  /** In exclusive: start the instance (from its volatile state when it has one). */
  startRun(name: string): Promise<string>;
  /** In exclusive: stop its run, if any. */
  stopRun(name: string): Promise<void>;
  /** Keep asking the destination of a locked instance until its outcome is known. */
  scheduleSettle(uuid: string): void;
}
