// The host's grouped vtpmd processes (vtpmd --group G: one process hosting the engines of
// the instances created with `--group G`), as the manager keeps them: started on the first
// start of a member (one a crashed manager left is stopped first), and when one dies every
// member's run dies with it and is relaunched by the supervisor, which starts it again.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import { processAlive, procStartTime } from '../drivers/base/libc.ts';
import { stopProcess } from '../drivers/host/daemon.ts';
import { readBounded, writeFileAtomic } from '../drivers/host/state-dir.ts';
import { VtpmdGroup } from '../vtpmd/group-client.ts';

export interface RunningGroup {
  g: VtpmdGroup;
  /** Resolves when the process is gone: how. */
  gone: Promise<string>;
}

export class GroupHost {
  private readonly running = new Map<string, Promise<RunningGroup>>();
  private closed = false;

  constructor(private readonly o: { runDir: string; log: (line: string) => void }) {}

  private get dir(): string {
    return join(this.o.runDir, 'groups');
  }

  /** Group `name`'s process (started on first need, or again after it died). */
  ready(name: string): Promise<RunningGroup> {
    let r = this.running.get(name);
    if (!r) {
      r = this.start(name);
      this.running.set(name, r);
      r.catch(() => this.running.delete(name));
    }
    return r;
  }

  private async start(name: string): Promise<RunningGroup> {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const record = join(this.dir, `${name}.cbor`);
    await stopLeft(record);
    const g = await VtpmdGroup.start({ dir: this.o.runDir, group: name, log: join(this.dir, `${name}.log`) });
    writeFileAtomic(record, encode({ v: 1, pid: g.pid, start: procStartTime(g.pid) }));
    this.o.log(`vtpmd group ${name} running (pid ${g.pid})`);
    const gone = g.exited.then((x) => {
      const how = `exited (${x.signal ?? `code ${x.code}`})`;
      this.running.delete(name);
      if (!this.closed) this.o.log(`vtpmd group ${name} (pid ${g.pid}) ${how}: its members restart`);
      return how;
    });
    return { g, gone };
  }

  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.running.values()];
    this.running.clear();
    for (const r of all) {
      const got = await r.catch(() => undefined);
      if (got) await got.g.shutdown();
    }
  }
}

/** A group process a previous manager left (killed outright): stopped. */
async function stopLeft(record: string): Promise<void> {
  const bytes = readBounded(record, 256, 'a vtpmd group record');
  if (!bytes) return;
  const r = decode(bytes) as { v?: unknown; pid?: unknown; start?: unknown };
  if (r?.v === 1 && Number.isInteger(r.pid) && Number.isInteger(r.start) && processAlive(r.pid as number, r.start as number)) await stopProcess(r.pid as number, 60_000);
}
