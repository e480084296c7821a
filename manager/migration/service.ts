// The host's migration side, as the control API sees it: its identity, its trusted hosts,
// migrations out, the listener for migrations in, and settling what a crash or a cut left
// undecided (retried with a backoff until the destination answers).
import type * as net from 'node:net';
import { describeError } from '../../drivers/base/errors.ts';
import { parseAddress } from './channel.ts';
import { listenForMigrations } from './destination.ts';
import type { MigrationHost } from './host-access.ts';
import { migrateOut, settle, type MigrationResult, type Progress } from './source.ts';
import type { TrustedHost } from './trust.ts';

const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 30_000;

export class MigrationService {
  private server: net.Server | null = null;
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private stopped = false;

  constructor(private readonly h: MigrationHost) {}

  /** At host start: imports a crash interrupted are dropped (their source still holds the
   *  instance); migrations out whose outcome is unknown are settled in the background. */
  async recover(): Promise<void> {
    for (const rec of this.h.allRecords()) {
      if (rec.meta.migration === 'in') {
        await this.h.exclusive(() => this.h.dropRecord(rec.uuid));
        this.h.log(`dropped the unfinished import of ${rec.name} (${rec.uuid}): its source keeps it`);
      } else if (rec.meta.migration === 'out') this.scheduleSettle(rec.uuid, 0);
    }
  }

  async listen(spec: string): Promise<void> {
    this.server = await listenForMigrations(this.h, parseAddress(spec));
  }

  identity(): { host: string; fingerprint: string; document: Uint8Array } {
    return { host: this.h.identity.host, fingerprint: this.h.identity.fingerprint, document: this.h.identity.document };
  }

  trustAdd(name: string, document: Uint8Array): Promise<TrustedHost> {
    return this.h.exclusive(async () => this.h.trust.add(name, document));
  }

  trustRemove(name: string): Promise<void> {
    return this.h.exclusive(async () => this.h.trust.remove(name));
  }

  trustList(): TrustedHost[] {
    return this.h.trust.list();
  }

  migrate(name: string, to: string, progress: Progress): Promise<MigrationResult> {
    return migrateOut(this.h, name, to, progress);
  }

  scheduleSettle(uuid: string, delay = FIRST_RETRY_MS): void {
    if (this.stopped || this.timers.has(uuid)) return;
    const t = setTimeout(() => {
      this.timers.delete(uuid);
      settle(this.h, uuid).then(
        (outcome) => this.h.log(`migration of ${uuid} settled: ${outcome === 'moved' ? 'it runs on its destination' : 'it stays here'}`),
        (e) => {
          this.h.log(`migration of ${uuid} not settled yet: ${describeError(e)}; asking again in ${Math.min(MAX_RETRY_MS, delay * 2 || FIRST_RETRY_MS)} ms`);
          this.scheduleSettle(uuid, Math.min(MAX_RETRY_MS, delay * 2 || FIRST_RETRY_MS));
        },
      );
    }, delay);
    this.timers.set(uuid, t);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    const s = this.server;
    this.server = null;
    if (s) await new Promise<void>((r) => s.close(() => r()));
  }
}
