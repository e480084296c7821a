// The manager keeps a host's instances running: kill -9 of a vtpmd in the middle of a
// burst of acknowledged NV counter increments, of a front end, and of the authority; each
// time the guest's node answers again by itself within 10 s, and no acknowledged
// increment is lost.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { probeNode } from '../../drivers/tpmfront/probe.ts';
import { runTool } from '../clients/run.ts';
import { stopHostAfterTest, vtpm } from '../guest/host.ts';

const ROUNDS = Number(process.env.VTPM_CRASH_ROUNDS ?? 20);
const COUNTER = '0x1500030';

async function ok(t: Test, args: string[]): Promise<string> {
  const r = await vtpm(args, 120_000);
  t.equal(r.code, 0, `vtpm ${args.join(' ')}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  return r.stdout.trim();
}

/** Until the node answers a GetRandom again; returns how long that took (ms). */
async function answersAgain(node: string, withinMs: number): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    try {
      probeNode(node, '2.0');
      return Date.now() - t0;
    } catch {
      if (Date.now() - t0 > withinMs) return -1;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

interface Listed {
  name: string;
  state: string;
  restarts?: number;
  reason?: string;
  node?: string;
  vtpmd?: { pid: number };
}

/** A pid to kill -9: never 0 or below (that would signal this test's own process group). */
function victimPid(pid: number | undefined, what: string): number {
  if (!pid || !(pid > 0)) throw new Error(`no ${what} to kill (pid ${pid})`);
  return pid;
}

t.test('kill -9 a vtpmd mid-burst, a front end, the authority: the guest answers again by itself, nothing acknowledged lost', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-sup-'));
  const args = ['--run-dir', join(base, 'run')];
  t.teardown(async () => {
    try {
      await stopHostAfterTest(args[1]!);
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
  });
  await ok(t, ['host', 'start', '--state-dir', join(base, 'state'), '--hw', `tis:${join(base, 'hwtpm')}`, ...args]);
  await ok(t, ['create', 'web', ...args]);
  const node = await ok(t, ['start', 'web', ...args]);
  const tcti = ['-T', `device:${node}`];
  const mustRun = async (tool: string, a: string[]) => {
    const r = await runTool(`tpm2_${tool}`, [...tcti, ...a], { timeoutMs: 30_000 });
    if (r.code !== 0) throw new Error(`tpm2_${tool}: ${r.stderr}`);
    return r;
  };
  await mustRun('nvdefine', [COUNTER, '-C', 'o', '-s', '8', '-a', 'nt=counter|ownerread|ownerwrite|authread|authwrite']);
  await mustRun('nvincrement', [COUNTER, '-C', 'o']); // a counter reads only once written
  const readCounter = async () => {
    const out = join(base, 'counter.out');
    await mustRun('nvread', [COUNTER, '-C', 'o', '-s', '8', '-o', out]);
    return readFileSync(out).readBigUInt64BE(0);
  };
  const list = async (): Promise<Listed[]> => JSON.parse(await ok(t, ['list', '--json', ...args]));

  let acked = 1n;
  for (let round = 0; round < ROUNDS; round++) {
    const before = await readCounter();
    if (before < acked) t.fail(`round ${round}: counter ${before} is below the ${acked} acknowledged increments`);
    acked = before;
    // A burst of increments, each acknowledged (exit 0) or failed, with a kill -9 in the middle.
    // From the listing: a warm vtpmd's command line does not name its instance.
    const victim = victimPid((await list()).find((i) => i.name === 'web')?.vtpmd?.pid, 'vtpmd of web');
    const burst = (async () => {
      for (let i = 0; i < 40; i++) {
        const r = await runTool('tpm2_nvincrement', [...tcti, COUNTER, '-C', 'o'], { timeoutMs: 30_000 });
        if (r.code === 0) acked++;
        else return;
      }
    })();
    await new Promise((r) => setTimeout(r, 150 + ((round * 37) % 300)));
    process.kill(victim, 'SIGKILL');
    await burst;
    const back = await answersAgain(node, 10_000);
    if (back < 0) {
      t.fail(`round ${round}: the node did not answer within 10 s of the kill`);
      break;
    }
    const after = await readCounter();
    // What was acknowledged is there; at most the one command in flight at the kill went
    // through without its acknowledgement.
    if (after < acked || after > acked + 1n) t.fail(`round ${round}: counter ${after}, acknowledged ${acked}`);
    acked = after;
  }
  t.pass(`${ROUNDS} kills of vtpmd mid-burst: the node answered again each time and the counter (${acked}) kept every acknowledged increment`);
  const l1 = (await list()).find((i) => i.name === 'web')!;
  t.equal(l1.state, 'running');
  t.ok((l1.restarts ?? 0) >= ROUNDS, `restarts counted (${l1.restarts})`);
  t.match(l1.reason, /vtpmd exited \(SIGKILL\)/, 'the last problem is named');

  // The host's front-end process (frontd) serves every raw tpm0 node.
  const front = victimPid(Number((await runTool('pgrep', ['-f', `drivers/tpmfront/frontd.js --dir ${join(base, 'run')}`])).stdout.trim().split('\n')[0]), 'frontd');
  process.kill(front, 'SIGKILL');
  t.ok((await answersAgain(node, 10_000)) >= 0, 'after kill -9 of the front-end process the node answers again within 10 s');
  t.match((await list()).find((i) => i.name === 'web')!.reason, /front-end process exited \(SIGKILL\)/);

  const authority = victimPid(Number((await runTool('pgrep', ['-f', `drivers/xen/authority.js --dir ${join(base, 'run')}`])).stdout.trim().split('\n')[0]), 'authority');
  process.kill(authority, 'SIGKILL');
  await new Promise((r) => setTimeout(r, 300));
  t.ok((await answersAgain(node, 10_000)) >= 0, 'after kill -9 of the authority the node answers again within 10 s');
  t.equal(await readCounter(), acked, 'and the counter is intact');
});

t.test('kill -9 the manager mid-burst, then start it again: its instances come back, nothing acknowledged lost', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-mgrkill-'));
  const run = join(base, 'run');
  const args = ['--run-dir', run];
  const start = ['host', 'start', '--state-dir', join(base, 'state'), '--hw', `tis:${join(base, 'hwtpm')}`, ...args];
  t.teardown(async () => {
    try {
      await stopHostAfterTest(args[1]!);
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
  });
  await ok(t, start);
  await ok(t, ['create', 'web', ...args]);
  const node = await ok(t, ['start', 'web', ...args]);
  const tcti = ['-T', `device:${node}`];
  const tool = (name: string, a: string[]) => runTool(`tpm2_${name}`, [...tcti, ...a], { timeoutMs: 30_000 });
  const must = async (name: string, a: string[]) => {
    const r = await tool(name, a);
    if (r.code !== 0) throw new Error(`tpm2_${name}: ${r.stderr}`);
  };
  await must('nvdefine', [COUNTER, '-C', 'o', '-s', '8', '-a', 'nt=counter|ownerread|ownerwrite|authread|authwrite']);
  await must('nvincrement', [COUNTER, '-C', 'o']);
  const readCounter = async () => {
    const out = join(base, 'counter.out');
    await must('nvread', [COUNTER, '-C', 'o', '-s', '8', '-o', out]);
    return readFileSync(out).readBigUInt64BE(0);
  };
  const rounds = Math.max(1, Math.round(ROUNDS / 2));
  let acked = 1n;
  let worst = 0;
  for (let round = 0; round < rounds; round++) {
    const manager = Number(JSON.parse(await ok(t, ['host', 'status', '--json', ...args])).pid);
    const burst = (async () => {
      for (let i = 0; i < 40; i++) {
        const r = await tool('nvincrement', [COUNTER, '-C', 'o']);
        if (r.code !== 0) return;
        acked++;
      }
    })();
    await new Promise((r) => setTimeout(r, 150 + ((round * 53) % 300)));
    process.kill(manager, 'SIGKILL');
    await burst;
    const r = await vtpm(start, 120_000);
    if (r.code !== 0) {
      t.fail(`round ${round}: host start after the kill: ${r.stderr.trim()}`);
      break;
    }
    const back = await answersAgain(node, 10_000);
    if (back < 0) {
      t.fail(`round ${round}: the instance did not come back within 10 s of the new manager`);
      break;
    }
    worst = Math.max(worst, back);
    const after = await readCounter();
    if (after < acked || after > acked + 1n) t.fail(`round ${round}: counter ${after}, acknowledged ${acked}`);
    acked = after;
  }
  t.pass(`${rounds} kills of the manager mid-burst: each new manager brought the instance back (slowest ${worst} ms after its start) with every acknowledged increment (${acked})`);
  // Every vtpmd of this run dir but the warm pool's waiting ones serves an instance (counted
  // once the pool is full: one still starting is not in its list yet).
  type Status = { warm: { size: number; pids: number[] } };
  let st = JSON.parse(await ok(t, ['host', 'status', '--json', ...args])) as Status;
  for (const end = Date.now() + 15_000; st.warm.pids.length < st.warm.size && Date.now() < end; ) {
    await new Promise((r) => setTimeout(r, 200));
    st = JSON.parse((await vtpm(['host', 'status', '--json', ...args])).stdout) as Status;
  }
  const pool = st.warm.pids;
  const vtpmds = (await runTool('pgrep', ['-f', `vtpmd/main\\.js --dir ${run}`])).stdout.trim().split('\n').filter(Boolean).map(Number);
  const fronts = (await runTool('pgrep', ['-fc', `tpmfront/frontd\\.js --dir ${run}`])).stdout.trim();
  t.equal(vtpmds.filter((p) => !pool.includes(p)).length, 1, 'one vtpmd serving: the crashed runs were cleared');
  t.equal(fronts, '1', 'one front-end process');
});
