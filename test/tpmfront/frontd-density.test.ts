// Density: what frontd (one front-end process per host) costs with 1, 10 and 50 guests
// attached, connected and having answered, beside today's per-guest front process
// (drivers/tpmfront/front.ts) serving one guest; PSS from /proc/PID/smaps_rollup, both the
// built JavaScript the manager runs. Every one of the 50 nodes must answer. Compare the
// figures of one run only: started under the test runner every Node process measures more
// anonymous memory than when started from a shell (a bare `node -e` on this machine: 20 MB
// against 6 MB), for a reason not found.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { builtScript } from '../../drivers/base/modules.ts';
import { startDaemon, stopProcess } from '../../drivers/host/daemon.ts';
import { waitNodeAnswers } from '../../drivers/tpmfront/probe.ts';
import { startFrontdHost, type FrontdGuest } from './frontd-host.ts';
import { rcOf, roundTrip } from './node-scenarios.ts';

const pssKb = (pid: number): number => Number(/^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1]);
const settle = () => new Promise((r) => setTimeout(r, 1000));

async function answers(g: FrontdGuest): Promise<number> {
  const fh = await open(g.node.path, 'r+');
  try {
    return rcOf(await roundTrip(fh));
  } finally {
    await fh.close();
  }
}

const host = await startFrontdHost('frontd-density', { threads: 2 });
let soloPss = 0;
t.teardown(() => host.stop());

t.test("today's per-guest front process, one guest", async (t) => {
  const name = 'solo';
  const front = await startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', host.dir, '--name', name, '--fuse', 'raw'], { log: join(host.dir, 'front-solo.log'), stdin: true });
  t.teardown(() => stopProcess(front.pid));
  const vtpmd = await startDaemon(builtScript('vtpmd/main'), ['--dir', host.dir, '--name', name, '--tpm', '2.0', '--front', String(front.info.domid)], { log: join(host.dir, 'vtpmd-solo.log') });
  t.teardown(() => stopProcess(vtpmd.pid));
  front.stdin!.end(`${vtpmd.info.domid}\n`);
  await waitNodeAnswers(join(host.dir, name, 'dev', 'tpm0'), '2.0', 30_000, () => undefined);
  await settle();
  const pss = pssKb(front.pid);
  t.ok(pss > 0, 'measured');
  t.comment(`per-guest front process: PSS ${pss} kB for 1 guest`);
  soloPss = pss;
});

t.test('frontd with 1, 10 and 50 guests', async (t) => {
  const guests: FrontdGuest[] = [];
  const pss: Record<number, number> = {};
  for (const n of [1, 10, 50]) {
    while (guests.length < n) guests.push(await host.addGuest(`d${guests.length}`));
    const rcs = await Promise.all(guests.map(answers));
    t.ok(rcs.every((rc) => rc === 0), `all ${n} nodes answer`);
    await settle();
    pss[n] = pssKb(host.frontd.pid);
    t.comment(`frontd: PSS ${pss[n]} kB with ${n} guest(s) (${Math.round(pss[n]! / n)} kB per guest); per-guest processes: ${soloPss * n} kB`);
  }
  const { load } = await host.client.status();
  t.same(load, [25, 25], 'two FUSE threads, 25 mounts each');
  // Each further guest costs a fraction of a process: 50 guests in frontd cost less than
  // three per-guest front processes.
  t.ok(pss[50]! < 3 * soloPss, `frontd with 50 guests (${pss[50]} kB) < 3 per-guest front processes (${3 * soloPss} kB)`);
  t.ok(pss[50]! - pss[10]! < 40 * 1024 * 0.5, `40 more guests cost ${pss[50]! - pss[10]!} kB (< 0.5 MB each)`);
});
