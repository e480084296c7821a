// Density benchmark: many guests on one host (isolated, then grouped), beside swtpm processes, same run.
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
//   npm run bench -- density   VTPM_BENCH_GUESTS=100 (isolated) VTPM_BENCH_GROUPED=500
//                              VTPM_BENCH_GROUP_SIZE=50 VTPM_BENCH_SWTPM=50 by default
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
const GROUPED = Number(process.env.VTPM_BENCH_GROUPED ?? 500);
const GROUP_SIZE = Number(process.env.VTPM_BENCH_GROUP_SIZE ?? 50);
const SWTPMS = Number(process.env.VTPM_BENCH_SWTPM ?? 50);
const WARM = Number(process.env.VTPM_BENCH_WARM ?? 4);
const IDLE_S = 10;
const SETTLE_MS = Number(process.env.VTPM_BENCH_SETTLE_MS ?? 45_000);
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

interface Phase {
  what: string;
  guests: number;
  starts: number[];
  pssKb: number;
  processes: number;
  idle: { cpuPct: number; wakePerS: number };
  rates: [Concurrent, Concurrent, Concurrent, Concurrent]; // ours unpinned, swtpm unpinned, ours pinned, swtpm pinned
}

/** One host with `n` guests (in groups of `groupSize`, or isolated when 0): start times,
 *  PSS, idle cost, and 10 guests' rate beside 10 of `swtpms`. */
async function phase(dir: string, n: number, groupSize: number, swtpms: SwtpmProcess[], client: string): Promise<Phase> {
  const runDir = join(dir, groupSize ? 'run-grouped' : 'run-isolated');
  const run = ['--run-dir', runDir];
  const sock = join(runDir, 'manager.sock');
  const api = (op: string, args: Record<string, unknown>) => rpcOnce(sock, 'the manager', op, { control: CONTROL_VERSION, ...args }, 120_000);
  const what = groupSize ? `${n} grouped (${Math.ceil(n / groupSize)} groups of ${groupSize})` : `${n} isolated`;
  await vtpm(['host', 'start', '--state-dir', join(dir, `state-${groupSize}`), '--hw', `tis:${join(dir, `hw-${groupSize}`)}`, '--warm', String(groupSize ? 0 : WARM), ...run]);
  try {
    const names = Array.from({ length: n }, (_, i) => `d${i}`);
    for (const [i, name] of names.entries()) {
      await api('create', { name, tpm: '2.0', ...(groupSize ? { group: `g${Math.floor(i / groupSize)}` } : {}) });
      if ((i + 1) % 50 === 0) process.stderr.write(`density: ${what}: ${i + 1} created\n`);
    }
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
      if ((i + 1) % 50 === 0) process.stderr.write(`density: ${what}: ${i + 1} started\n`);
      // Starts as a user's would come: the warm pool refills in between (a burst of starts
      // beyond the pool's size runs cold).
      if (!groupSize) await sleep(300);
    }
    // Idle means after start-up: V8 settles (collections, tier-up) for ~40 s in a fresh process.
    await sleep(SETTLE_MS);
    const ours = hostProcesses(runDir);
    const swPids = swtpms.map((s) => s.proc.pid!);
    const pss = sum(ours.map(pssKb));
    const idleOurs = await idle(ours, IDLE_S);
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
    return { what, guests: n, starts, pssKb: pss, processes: ours.length, idle: idleOurs, rates: [u, uSw, p, pSw] };
  } finally {
    await vtpm(['host', 'stop', ...run]).catch((e: Error) => console.error(`stop host: ${e.message}`));
  }
}

export async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-density-'));
  const client = buildClient();
  const swtpms: SwtpmProcess[] = [];
  try {
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
    await sleep(2000);
    const swPids = swtpms.map((s) => s.proc.pid!);
    const swPss = sum(swPids.map(pssKb));
    const idleSw = await idle(swPids, IDLE_S);
    const phases: Phase[] = [];
    if (GUESTS > 0) phases.push(await phase(dir, GUESTS, 0, swtpms, client));
    if (GROUPED > 0) phases.push(await phase(dir, GROUPED, GROUP_SIZE, swtpms, client));
    const perSw = swPss / SWTPMS;
    for (const ph of phases) {
      const grouped = ph.what.includes('grouped');
      printTable(`density: ${ph.what} TPM 2.0 guests beside ${SWTPMS} swtpm, same run`, [
        { what: `start (control API) to a GetRandom through tpm0${grouped ? '' : ` (warm pool ${WARM})`}`, ours: stats(ph.starts), base: stats(swStarts), baseName: 'swtpm start to first answer', target: 1 },
      ]);
      const perGuest = ph.pssKb / ph.guests;
      const target = grouped ? 3072 : 10240;
      const [u, uSw, p, pSw] = ph.rates;
      console.log('\n| measurement | ours | swtpm | ratio | target |\n|---|---|---|---|---|');
      console.log(`| PSS per guest, kB (${ph.processes} host processes ÷ ${ph.guests} guests; swtpm: ${SWTPMS} processes ÷ ${SWTPMS}) | ${perGuest.toFixed(0)} | ${perSw.toFixed(0)} | ${(perGuest / perSw).toFixed(1)} | ≤ ${target} kB ${perGuest <= target ? 'met' : 'MISSED'} |`);
      const scaled = (ph.idle.cpuPct * 500) / ph.guests;
      console.log(`| idle CPU over ${IDLE_S} s, % of one core (all ${ph.guests} guests / all ${SWTPMS} swtpm) | ${ph.idle.cpuPct.toFixed(2)} | ${idleSw.cpuPct.toFixed(2)} | | 500 guests ≤ 1 %: ${scaled.toFixed(2)} % scaled ${scaled <= 1 ? 'met' : 'MISSED'} |`);
      console.log(`| idle context switches per second per guest | ${(ph.idle.wakePerS / ph.guests).toFixed(3)} | ${(idleSw.wakePerS / SWTPMS).toFixed(3)} | | |`);
      console.log(`| 10 guests' GetRandom/s, unpinned | ${u.rate.toFixed(0)} | ${uSw.rate.toFixed(0)} | ${(u.rate / uSw.rate).toFixed(2)} | ≥ 1 ${u.rate >= uSw.rate ? 'met' : 'MISSED'} |`);
      console.log(`| 10 guests' GetRandom/s, all on CPU 0 | ${p.rate.toFixed(0)} | ${pSw.rate.toFixed(0)} | ${(p.rate / pSw.rate).toFixed(2)} | ≥ 1 ${p.rate >= pSw.rate ? 'met' : 'MISSED'} |`);
      console.log(`\n${ph.what}: all running at once (${ph.processes} host processes, PSS ${(ph.pssKb / 1024).toFixed(0)} MB); at this PSS a 24 GiB host holds ~${Math.floor((24 * 1024 * 1024) / perGuest)} such guests by memory`);
    }
  } finally {
    for (const s of swtpms) await s.stop().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
    rmSync(client, { force: true });
  }
}

if (isMain(import.meta.url)) await main();
