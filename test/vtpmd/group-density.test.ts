// Memory of the grouped vtpmd: PSS of the group process (/proc/PID/smaps_rollup) with 1, 10
// and 50 engines, each with its guest connected and a few commands run (a GetRandom, a PCR
// extend, a PCR read), printed per engine with its anonymous part. The target is 3 MB PSS
// per guest (swtpm: ~1.8 MB). Measured in group-density-run.ts, a process of its own, so
// the group process runs as a host runs it (without the test runner's import hook).
import t from 'tap';
import { join } from 'node:path';
import { mustRun } from '../clients/run.ts';

const mb = (kb: number) => (kb / 1024).toFixed(2);

t.test('PSS of one group process with 1, 10 and 50 engines', async (t) => {
  const run = await mustRun('/usr/bin/env', ['-u', 'NODE_OPTIONS', process.execPath, '--import', 'tsx', join(import.meta.dirname, 'group-density-run.ts')], { cwd: join(import.meta.dirname, '../..'), timeoutMs: 600_000 });
  const r = JSON.parse(run.stdout.trim().split('\n').pop()!) as { at: Record<string, { pss: number; anon: number }>; answered: number; listed: number };
  for (const n of [0, 1, 10, 50]) {
    const m = r.at[n]!;
    t.comment(`${n} engines: PSS ${mb(m.pss)} MB (anonymous ${mb(m.anon)} MB)${n ? `, ${mb(m.pss / n)} MB PSS per engine` : ''}`);
  }
  t.comment(`each engine beyond the first (1 → 50): PSS ${mb((r.at[50]!.pss - r.at[1]!.pss) / 49)} MB, anonymous ${mb((r.at[50]!.anon - r.at[1]!.anon) / 49)} MB`);
  t.equal(r.listed, 50, '50 members listed');
  t.equal(r.answered, 50, 'all 50 guests answer after the measurement');
  t.ok(r.at[50]!.pss / 50 <= 3 * 1024, `50 engines: ${mb(r.at[50]!.pss / 50)} MB PSS per engine, within 3 MB`);
});
