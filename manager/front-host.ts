// The host's one front-end process (drivers/tpmfront/frontd.ts) as the manager keeps it:
// started with the manager (one left by a crashed manager is stopped first: its guests
// are relaunched anyway), restarted with backoff when it dies, and its per-guest events
// routed to the run of that guest. Runs of raw tpm0 guests attach to it (guest-front.ts).
import { join } from 'node:path';
import { VtpmError } from '../drivers/base/errors.ts';
import { builtScript } from '../drivers/base/modules.ts';
import { stopProcess } from '../drivers/host/daemon.ts';
import { FRONTD_LOG, FRONTD_RECORD, recordProcess, stopLeftFrontd } from './leftovers.ts';
import { procStartTime } from '../drivers/base/libc.ts';
import { FrontdClient, startFrontd, type GuestInfo } from '../drivers/tpmfront/frontd-client.ts';

const RESTART_MIN_MS = 200;
const RESTART_MAX_MS = 10_000;

export interface Frontd {
  client: FrontdClient;
  pid: number;
  /** Resolves when this frontd is gone (its connection dropped): why. */
  gone: Promise<string>;
}

export class FrontendHost {
  private current: Promise<Frontd> | null = null;
  private readonly troubles = new Map<string, (g: GuestInfo) => void>();
  private closed = false;

  constructor(private readonly o: { runDir: string; log: (line: string) => void }) {}

  /** The running frontd (started, or restarted after it died, on first need). */
  ready(): Promise<Frontd> {
    if (this.closed) return Promise.reject(new VtpmError('ECLOSED', 'the manager is stopping'));
    return (this.current ??= this.launch());
  }

  /** `name`'s node stopped working by itself (its vtpmd went, its domain failed). */
  onTrouble(name: string, cb: (g: GuestInfo) => void): () => void {
    this.troubles.set(name, cb);
    return () => {
      if (this.troubles.get(name) === cb) this.troubles.delete(name);
    };
  }

  private async launch(): Promise<Frontd> {
    for (let delay = RESTART_MIN_MS; ; delay = Math.min(delay * 2, RESTART_MAX_MS)) {
      try {
        return await this.startOne();
      } catch (e) {
        if (this.closed) throw e;
        this.o.log(`the front-end process did not start: ${(e as Error).message}; next try in ${delay} ms`);
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  private async startOne(): Promise<Frontd> {
    await this.stopLeftover();
    const d = await startFrontd(this.o.runDir, { log: join(this.o.runDir, FRONTD_LOG), script: builtScript('drivers/tpmfront/frontd') });
    recordProcess(join(this.o.runDir, FRONTD_RECORD), d.pid, procStartTime(d.pid));
    const client = await FrontdClient.connect(d.socket);
    client.onTrouble((g) => this.troubles.get(g.name)?.(g));
    const gone = new Promise<string>((resolve) => {
      let said = false;
      const end = (why: string) => {
        if (said) return;
        said = true;
        this.current = null;
        if (!this.closed) this.o.log(`the front-end process (pid ${d.pid}) ${why}: every tpm0 guest on it restarts`);
        resolve(why);
      };
      const exited = d.exited.then((x) => `exited (${x.signal ?? `code ${x.code}`})`);
      void exited.then(end);
      // The connection usually drops first: how the process ended, if it says so soon.
      client.onLost(() => void Promise.race([exited, new Promise<string>((r) => setTimeout(() => r('went away (its connection dropped)'), 1000).unref())]).then(end));
    });
    this.o.log(`front-end process running (pid ${d.pid})`);
    return { client, pid: d.pid, gone };
  }

  private async stopLeftover(): Promise<void> {
    const pid = await stopLeftFrontd(this.o.runDir);
    if (pid !== undefined) this.o.log(`stopped the front-end process a previous manager left (pid ${pid})`);
  }

  async close(): Promise<void> {
    this.closed = true;
    const cur = await this.current?.catch(() => undefined);
    this.current = null;
    if (!cur) return;
    await cur.client.close().catch(() => undefined);
    await stopProcess(cur.pid, 30_000);
  }
}
