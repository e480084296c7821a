// The host's grouped vtpmd processes (vtpmd --group G: one process hosting the engines of
// the instances created with `--group G`), as the manager keeps them: started on the first
// start of a member (one a crashed manager left is stopped first), and when one dies every
// member's run dies with it and is relaunched by the supervisor, which starts it again.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { VtpmdGroup } from '../vtpmd/group-client.ts';
import { GROUPS_DIR, recordProcess, stopRecorded } from './leftovers.ts';
import { procStartTime } from '../drivers/base/libc.ts';

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
    return join(this.o.runDir, GROUPS_DIR);
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
    await stopRecorded(record, 60_000);
    const g = await VtpmdGroup.start({ dir: this.o.runDir, group: name, log: join(this.dir, `${name}.log`) });
    recordProcess(record, g.pid, procStartTime(g.pid));
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
