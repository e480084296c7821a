// Density benchmark: many guests on one host, beside as many swtpm processes, same run.
//
// - start-to-first-command of `start` through the control API (a warm pool is kept: the
//   manager's --warm) to a GetRandom answered through the guest's own tpm0, p50/p99,
//   beside a `swtpm socket` start to its first answer;
// - PSS per guest: every process of the host (manager, authority, vtpmd, front ends, the
//   warm pool) summed and divided by the guests, beside N swtpm processes' PSS ÷ N;
// - idle: CPU and context switches of all of them over 10 s with nothing to do;
// - 10 guests' aggregate GetRandom/s beside 10 swtpm processes, unpinned and with every
//   process of both sides pinned to CPU 0 (which removes this VM's idle-wake cost).
//
//   npm run bench -- density      VTPM_BENCH_GUESTS=100 VTPM_BENCH_SWTPM=50 by default
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { rpcOnce } from '../../drivers/base/rpc.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';
import { CONTROL_VERSION } from '../../manager/control.ts';
import { launchSwtpm, type SwtpmProcess } from '../support/swtpm.ts';
import { buildClient, concurrent, cpuUs, isMain, printTable, pssKb, stats, switches, TcpTpmClient, type Concurrent } from './lib.ts';

const GUESTS = Number(process.env.VTPM_BENCH_GUESTS ?? 100);
const SWTPMS = Number(process.env.VTPM_BENCH_SWTPM ?? 50);
const WARM = Number(process.env.VTPM_BENCH_WARM ?? 4);
const IDLE_S = 10;
const VTPM = join(new URL('.', import.meta.url).pathname, '..', 'vtpm.sh');
const GETRANDOM = Buffer.from(tpm2.getRandom(16)).toString('hex');

function vtpm(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/env', ['-u', 'NODE_OPTIONS', VTPM, ...args], { encoding: 'utf8', timeout: 120_000 }, (err, stdout, stderr) =>
      err ? reject(new Error(`vtpm ${args.join(' ')}: ${stderr.trim() || err.message}`)) : resolve(stdout.trim()),
    );
  });
}

/** Every live process whose command line names `dir` (the host's run dir): the manager,
 *  the authority, each vtpmd and front end, the warm pool. */
function hostProcesses(dir: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, 'utf8').includes(dir)) out.push(Number(e));
    } catch {
      // exited while we looked
    }
  }
  return out;
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** CPU (% of one core) and context switches per second of `pids` over `s` seconds idle. */
async function idle(pids: number[], s: number): Promise<{ cpuPct: number; wakePerS: number }> {
  const c0 = pids.map(cpuUs);
  const w0 = pids.map(switches);
  await sleep(s * 1000);
  return { cpuPct: (sum(pids.map(cpuUs)) - sum(c0)) / (s * 1e6) * 100, wakePerS: (sum(pids.map(switches)) - sum(w0)) / s };
}

function pin(pids: number[], cpu: string): void {
  for (const p of pids) execFileSync('taskset', ['-a', '-p', '-c', cpu, String(p)], { stdio: 'ignore' });
}

async function getRandomVia(node: string): Promise<void> {
  const dev = await TpmDevice.open(node);
  try {
    tpm2.parseGetRandom(await dev.transmit(tpm2.getRandom(8)));
  } finally {
    await dev.close();
  }
}

export async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-density-'));
  const runDir = join(dir, 'run');
  const run = ['--run-dir', runDir];
  const sock = join(runDir, 'manager.sock');
  const api = (op: string, args: Record<string, unknown>) => rpcOnce(sock, 'the manager', op, { control: CONTROL_VERSION, ...args }, 120_000);
  const client = buildClient();
  const swtpms: SwtpmProcess[] = [];
  let hostUp = false;
  try {
    await vtpm(['host', 'start', '--state-dir', join(dir, 'state'), '--hw', `tis:${join(dir, 'hwtpm')}`, '--warm', String(WARM), ...run]);
    hostUp = true;
    const names = Array.from({ length: GUESTS }, (_, i) => `d${i}`);
    process.stderr.write(`density: creating ${GUESTS} instances\n`);
    for (const name of names) await api('create', { name, tpm: '2.0' });
    await sleep(3000); // the warm pool refills after the creates' endorsement runs
    const starts: number[] = [];
    const nodes: string[] = [];
    for (const [i, name] of names.entries()) {
      const t0 = process.hrtime.bigint();
      const r = await api('start', { name });
      const node = String(r.node);
      await getRandomVia(node);
      starts.push(Number(process.hrtime.bigint() - t0) / 1000);
      nodes.push(node);
      if ((i + 1) % 10 === 0) process.stderr.write(`density: ${i + 1}/${GUESTS} guests started\n`);
      // Starts as a user's would come: the pool has refilled in between (a burst of starts
      // beyond the pool's size runs cold).
      await sleep(300);
    }
    const swStarts: number[] = [];
    for (let i = 0; i < SWTPMS; i++) {
      const t0 = process.hrtime.bigint();
      const sw = await launchSwtpm('2.0', mkdtempSync(join(dir, 'swtpm-')));
      const c = await TcpTpmClient.connect(sw.port);
      tpm2.parseGetRandom(await c.transmit(tpm2.getRandom(8)));
      swStarts.push(Number(process.hrtime.bigint() - t0) / 1000);
      c.close();
      swtpms.push(sw);
    }
    await sleep(3000); // garbage collection after the starts
    const ours = hostProcesses(runDir);
    const swPids = swtpms.map((s) => s.proc.pid!);
    const oursPss = sum(ours.map(pssKb));
    const swPss = sum(swPids.map(pssKb));
    const idleOurs = await idle(ours, IDLE_S);
    const idleSw = await idle(swPids, IDLE_S);

    // 10 guests at once vs 10 swtpm, each driven by its own client process.
    const ten = nodes.slice(0, 10).map((target) => ({ kind: 'dev' as const, target }));
    const tenSw = swtpms.slice(0, 10).map((s) => ({ kind: 'tcp' as const, target: `127.0.0.1:${s.port}` }));
    const m = 2000;
    const rates = async (pinned: boolean): Promise<[Concurrent, Concurrent]> => {
      const all = `0-${cpus().length - 1}`;
      if (pinned) pin([...ours, ...swPids, process.pid], '0');
      try {
        await concurrent(client, ten, GETRANDOM, m / 4, ours);
        await concurrent(client, tenSw, GETRANDOM, m / 4, swPids);
        return [await concurrent(client, ten, GETRANDOM, m, ours), await concurrent(client, tenSw, GETRANDOM, m, swPids)];
      } finally {
        if (pinned) pin([...ours, ...swPids, process.pid], all);
      }
    };
    const [u, uSw] = await rates(false);
    const [p, pSw] = await rates(true);

    printTable(`density: ${GUESTS} isolated TPM 2.0 guests (warm pool ${WARM}) beside ${SWTPMS} swtpm`, [
      { what: 'start (control API) to a GetRandom through tpm0', ours: stats(starts), base: stats(swStarts), baseName: 'swtpm start to first answer', target: 1 },
    ]);
    const perGuest = oursPss / GUESTS;
    const perSw = swPss / SWTPMS;
    console.log('\n| measurement | ours | swtpm | ratio | target |\n|---|---|---|---|---|');
    console.log(`| PSS per guest, kB (${ours.length} host processes ÷ ${GUESTS} guests; swtpm: ${SWTPMS} processes ÷ ${SWTPMS}) | ${perGuest.toFixed(0)} | ${perSw.toFixed(0)} | ${(perGuest / perSw).toFixed(1)} | isolated ≤ 10240 kB ${perGuest <= 10240 ? 'met' : 'MISSED'} |`);
    console.log(`| idle CPU over ${IDLE_S} s, % of one core (all ${GUESTS} guests / all ${SWTPMS} swtpm) | ${idleOurs.cpuPct.toFixed(2)} | ${idleSw.cpuPct.toFixed(2)} | | ≤ 1 % for 500 guests: ${(idleOurs.cpuPct * 500 / GUESTS).toFixed(2)} % scaled ${idleOurs.cpuPct * 500 / GUESTS <= 1 ? 'met' : 'MISSED'} |`);
    console.log(`| idle context switches per second per guest | ${(idleOurs.wakePerS / GUESTS).toFixed(2)} | ${(idleSw.wakePerS / SWTPMS).toFixed(2)} | | |`);
    console.log(`| 10 guests' GetRandom/s, unpinned | ${u.rate.toFixed(0)} | ${uSw.rate.toFixed(0)} | ${(u.rate / uSw.rate).toFixed(2)} | ≥ 1 ${u.rate >= uSw.rate ? 'met' : 'MISSED'} |`);
    console.log(`| 10 guests' GetRandom/s, all on CPU 0 | ${p.rate.toFixed(0)} | ${pSw.rate.toFixed(0)} | ${(p.rate / pSw.rate).toFixed(2)} | ≥ 1 ${p.rate >= pSw.rate ? 'met' : 'MISSED'} |`);
    console.log(`\nguests running at once: ${GUESTS} (host processes ${ours.length}, PSS ${(oursPss / 1024).toFixed(0)} MB); a 24 GiB host at this PSS holds ~${Math.floor((24 * 1024 * 1024) / perGuest)} guests by memory`);
  } finally {
    for (const s of swtpms) await s.stop().catch(() => undefined);
    if (hostUp) await vtpm(['host', 'stop', ...run]).catch((e: Error) => console.error(`stop host: ${e.message}`));
    rmSync(dir, { recursive: true, force: true });
    rmSync(client, { force: true });
  }
}

if (isMain(import.meta.url)) await main();
