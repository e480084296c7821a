// Datapath benchmark: a guest's command through tpm0 (FUSE front end → shared page + event
// channels → vtpmd's engine), beside swtpm over TCP and beside fuse-native's own floor (a
// canned node), all measured in this run by the same C client loop (tpmclient.c).
// Also: a whole tpm2_getrandom process, 10 guests at once vs 10 swtpm, PSS per guest, the
// CPU each side spends per command (so spinning shows), and the guest's tpmrm0 (resource
// manager: context loads/saves around each command) against its tpm0, unpinned and pinned.
import { execFile, execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { buildClient, concurrent, cpuUs, isMain, printTable, pssKb, stats, Swtpm, switches, timeSync, type Stats } from './lib.ts';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';
import { bootTpm } from '../../drivers/tpm/boot.ts';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { eccSigningTemplate } from '../../drivers/tpm/tpm2-structures.ts';
import { cpus } from 'node:os';

const here = new URL('.', import.meta.url).pathname;
const VTPM = join(here, '..', 'vtpm.sh');

type FuseKind = 'raw' | 'native';
/** A started guest as `vtpm list --json` shows it. */
interface Guest {
  name: string;
  node: string;
  vtpmd: { pid: number };
  front: { pid: number };
}

/** The `vtpm` CLI as a user runs it (without a test runner's NODE_OPTIONS); its stdout. */
function vtpm(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/env', ['-u', 'NODE_OPTIONS', VTPM, ...args], { encoding: 'utf8', timeout: 120_000 }, (err, stdout, stderr) =>
      err ? reject(new Error(`vtpm ${args.join(' ')}: ${stderr.trim() || err.message}`)) : resolve(stdout.trim()),
    );
  });
}
const N = Number(process.env.VTPM_BENCH_N ?? 10_000);
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const GETRANDOM = hex(tpm2.getRandom(16));
const EXTEND = hex(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: createHash('sha256').update('b').digest() }]));

/** CreatePrimary of a P-256 signing key under the owner (empty password): keyclient's setup. */
const CREATE_SIGNING_KEY = hex(
  buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.CreatePrimary, (w) => {
    w.u32(tpm2.TPM_RH_OWNER);
    tpm2.writePasswordAuth(w);
    w.u16(4).u16(0).u16(0); // inSensitive: empty userAuth and data
    w.sized16(eccSigningTemplate()).u16(0).u32(0); // inPublic, outsideInfo, creationPCR
  }),
);
/** Sign(key, 32-byte digest, the key's scheme, null ticket); keyclient puts the key's handle in. */
const SIGN = hex(
  buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.Sign, (w) => {
    w.u32(0);
    tpm2.writePasswordAuth(w);
    w.sized16(createHash('sha256').update('bench').digest()).u16(0x0010).u16(0x8024).u32(tpm2.TPM_RH_NULL).u16(0);
  }),
);

/** One measured client run (tpmclient/keyclient argv), `pinned`: it and every thread of the
 *  servers on CPU 0 (the pure path cost; README "Measuring on these machines"). */
function measure(argv: string[], n: number, serverPids: number[], pinned: boolean): Run {
  const all = `0-${cpus().length - 1}`;
  const pin = (cpu: string) => serverPids.forEach((p) => execFileSync('taskset', ['-a', '-p', '-c', cpu, String(p)], { stdio: 'ignore' }));
  if (pinned) pin('0');
  try {
    const before = serverPids.map(cpuUs);
    const swBefore = serverPids.map(switches);
    const [file, args] = pinned ? ['taskset', ['-c', '0', ...argv]] : [argv[0]!, argv.slice(1)];
    const out = execFileSync(file, args, { encoding: 'utf8' }).trim().split(' ').map(Number);
    const total = n + Math.floor(n / 10);
    const serverCpu = serverPids.reduce((s, p, i) => s + cpuUs(p) - before[i]!, 0) / total;
    const serverSwitches = serverPids.reduce((s, p, i) => s + switches(p) - swBefore[i]!, 0) / total;
    return { lat: { n, median: out[0]!, p99: out[1]!, mean: NaN }, clientCpu: out[2]!, serverCpu, clientSwitches: out[3]!, serverSwitches };
  } finally {
    if (pinned) pin(all);
  }
}

/** The guest's tpmrm0 against its tpm0, same run: GetRandom, and Sign with a key loaded in
 *  the client's space (through tpmrm0 each Sign also costs a ContextLoad, a ContextSave and
 *  a FlushContext). Target: GetRandom ≤ 1.3× tpm0. */
export function tpmrmVsTpm0(client: string, keyClient: string, tpm0: string, pids: number[], n: number, what: string): void {
  const tpmrm0 = join(tpm0, '..', 'tpmrm0');
  const signN = Math.max(200, Math.floor(n / 10));
  const rows = [];
  const cpuRows: [string, Run][] = [];
  for (const pinned of [false, true]) {
    const how = pinned ? 'pinned to CPU 0' : 'unpinned';
    const rnd0 = measure([client, 'dev', tpm0, String(n), GETRANDOM], n, pids, pinned);
    const rndRm = measure([client, 'dev', tpmrm0, String(n), GETRANDOM], n, pids, pinned);
    const sign0 = measure([keyClient, tpm0, String(signN), CREATE_SIGNING_KEY, SIGN], signN, pids, pinned);
    const signRm = measure([keyClient, tpmrm0, String(signN), CREATE_SIGNING_KEY, SIGN], signN, pids, pinned);
    rows.push(
      { what: `GetRandom(16) tpmrm0, ${how}`, ours: rndRm.lat, base: rnd0.lat, baseName: 'tpm0', target: 1.3 },
      { what: `Sign (ECDSA P-256, loaded key) tpmrm0, ${how}`, ours: signRm.lat, base: sign0.lat, baseName: 'tpm0' },
    );
    cpuRows.push([`GetRandom tpm0, ${how}`, rnd0], [`GetRandom tpmrm0, ${how}`, rndRm], [`Sign tpm0, ${how}`, sign0], [`Sign tpmrm0, ${how}`, signRm]);
  }
  printTable(`tpmrm0 vs tpm0 of ${what}: ${n} GetRandom, ${signN} Sign each`, rows);
  console.log('\n| per command | client CPU µs | server CPU µs | client switches | server switches |\n|---|---|---|---|---|');
  for (const [what, r] of cpuRows) console.log(`| ${what} | ${r.clientCpu.toFixed(1)} | ${r.serverCpu.toFixed(1)} | ${r.clientSwitches.toFixed(2)} | ${r.serverSwitches.toFixed(2)} |`);
}

interface Run {
  lat: Stats;
  clientCpu: number;
  serverCpu: number;
  clientSwitches: number;
  serverSwitches: number;
}

function runClient(client: string, kind: 'dev' | 'tcp', target: string, cmd: string, n: number, serverPids: number[]): Run {
  const before = serverPids.map(cpuUs);
  const swBefore = serverPids.map(switches);
  const out = execFileSync(client, [kind, target, String(n), cmd], { encoding: 'utf8' }).trim().split(' ').map(Number);
  // The server's CPU covers the client's unmeasured warm-up too (n/10 more commands).
  const total = n + Math.floor(n / 10);
  const serverCpu = serverPids.reduce((s, p, i) => s + cpuUs(p) - before[i]!, 0) / total;
  const serverSwitches = serverPids.reduce((s, p, i) => s + switches(p) - swBefore[i]!, 0) / total;
  return { lat: { n, median: out[0]!, p99: out[1]!, mean: NaN }, clientCpu: out[2]!, serverCpu, clientSwitches: out[3]!, serverSwitches };
}

function wholeProcess(args: string[], runs = 30): Stats {
  const t: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = process.hrtime.bigint();
    const r = spawnSync('tpm2_getrandom', [...args, '16'], { stdio: 'ignore' });
    if (r.status !== 0) throw new Error(`tpm2_getrandom ${args.join(' ')} failed`);
    t.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
  return stats(t);
}

/** A raw tpm0 with no vtpmd behind it (support/engine-node.ts) in a child process. */
async function rawNode(dir: string, kind: 'engine' | 'canned'): Promise<[ChildProcess, string]> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(here, 'support', 'engine-node.ts'), dir, kind], { stdio: ['ignore', 'pipe', 'inherit'] });
  const path = await new Promise<string>((resolve, reject) => {
    child.stdout!.once('data', (d) => resolve(String(d).trim()));
    child.once('exit', (c) => reject(new Error(`${kind} node exited ${c}`)));
  });
  return [child, path];
}

/** The engine alone: GetRandom(16) straight into libtpms in this process. */
function engineInProcess(n: number): Stats {
  const engine = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  try {
    bootTpm(engine, { selfTest: false });
    const cmd = tpm2.getRandom(16);
    const out = new Uint8Array(4096);
    return timeSync(n, () => engine.processInto(cmd, out));
  } finally {
    engine.terminate();
  }
}


export async function main(): Promise<void> {
  const client = buildClient();
  const keyClient = buildClient('keyclient');
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-dp-'));
  // The host's manager in a private run dir starts every guest (create + start).
  const run = ['--run-dir', join(dir, 'run')];
  let hostUp = false;
  const guests: Guest[] = [];
  const swtpms: Swtpm[] = [];
  let canned: ReturnType<typeof spawn> | undefined;
  const helpers: ChildProcess[] = [];
  const start = async (name: string, fuse: FuseKind) => {
    await vtpm(['create', name, '--tpm', '2.0', ...run]);
    const node = await vtpm(['start', name, '--fuse', fuse, ...run]);
    const rows = JSON.parse(await vtpm(['list', '--json', ...run])) as (Partial<Guest> & { name: string })[];
    const row = rows.find((r) => r.name === name);
    if (!row?.vtpmd || !row.front || row.node !== node) throw new Error(`vtpm list does not show ${name} running at ${node}`);
    const g: Guest = { name, node, vtpmd: row.vtpmd, front: row.front };
    guests.push(g);
    return g;
  };
  try {
    await vtpm(['host', 'start', ...run, '--state-dir', join(dir, 'state'), '--hw', `tis:${join(dir, 'hwtpm')}`]);
    hostUp = true;
    const raw = await start('raw', 'raw');
    const nat = await start('native', 'native');
    const sw = await Swtpm.start('2.0');
    swtpms.push(sw);
    const cannedMnt = join(dir, 'canned');
    canned = spawn(process.execPath, ['--import', 'tsx', join(here, 'support', 'canned-node.ts'), cannedMnt], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      canned!.stdout!.once('data', () => resolve());
      canned!.once('exit', (c) => reject(new Error(`canned node exited ${c}`)));
    });
    const [engineNode, engineTpm0] = await rawNode(join(dir, 'engine'), 'engine');
    const [cannedRaw, cannedTpm0] = await rawNode(join(dir, 'canned-raw'), 'canned');
    helpers.push(engineNode, cannedRaw);
    const inProcess = engineInProcess(N);

    const pids = (g: Guest) => [g.front.pid, g.vtpmd.pid];
    const swtpmRand = runClient(client, 'tcp', `127.0.0.1:${sw.port}`, GETRANDOM, N, [sw.proc.pid!]);
    const swtpmExt = runClient(client, 'tcp', `127.0.0.1:${sw.port}`, EXTEND, N, [sw.proc.pid!]);
    const rawRand = runClient(client, 'dev', raw.node, GETRANDOM, N, pids(raw));
    const rawExt = runClient(client, 'dev', raw.node, EXTEND, N, pids(raw));
    const natRand = runClient(client, 'dev', nat.node, GETRANDOM, N, pids(nat));
    const natExt = runClient(client, 'dev', nat.node, EXTEND, N, pids(nat));
    const floor = runClient(client, 'dev', join(cannedMnt, 'tpm0'), GETRANDOM, N, [canned.pid!]);
    const fuseOnly = runClient(client, 'dev', cannedTpm0, GETRANDOM, N, [cannedRaw.pid!]);
    const engineInWorker = runClient(client, 'dev', engineTpm0, GETRANDOM, N, [engineNode.pid!]);

    printTable(`datapath: ${N} commands each, same C client loop (open once, write + read)`, [
      { what: 'GetRandom(16) tpm0 raw front end', ours: rawRand.lat, base: swtpmRand.lat, baseName: 'swtpm TCP', target: 1.5 },
      { what: 'PCR_Extend tpm0 raw front end', ours: rawExt.lat, base: swtpmExt.lat, baseName: 'swtpm TCP', target: 1.5 },
      { what: 'GetRandom(16) tpm0 fuse-native', ours: natRand.lat, base: swtpmRand.lat, baseName: 'swtpm TCP' },
      { what: 'PCR_Extend tpm0 fuse-native', ours: natExt.lat, base: swtpmExt.lat, baseName: 'swtpm TCP' },
      { what: 'GetRandom(16) tpm0 fuse-native', ours: natRand.lat, base: floor.lat, baseName: 'fuse-native canned floor' },
      { what: 'fuse-native canned floor', ours: floor.lat, base: swtpmRand.lat, baseName: 'swtpm TCP' },
    ]);
    // Each hop on its own, same run: where the raw front end's figure goes.
    console.log('\n## GetRandom(16) through tpm0 (raw), hop by hop (medians, µs)\n');
    console.log('| hop | µs | how measured |\n|---|---|---|');
    console.log(`| libtpms engine | ${inProcess.median.toFixed(1)} | in-process TPMLIB_Process loop |`);
    console.log(`| FUSE crossing (write + read requests, raw worker) | ${fuseOnly.lat.median.toFixed(1)} | tpm0 whose worker answers a canned response |`);
    console.log(`| tpmif + event channels + vtpmd, on the critical path | ${(rawRand.lat.median - fuseOnly.lat.median).toFixed(1)} | tpm0 with vtpmd (${rawRand.lat.median.toFixed(1)}) − the FUSE crossing (vtpmd runs while the client turns round from its write) |`);
    console.log(`| (libtpms in the FUSE worker instead of vtpmd) | ${engineInWorker.lat.median.toFixed(1)} | tpm0 whose worker runs libtpms: no overlap, engine on the critical path |`);
    console.log(`| swtpm over TCP, whole | ${swtpmRand.lat.median.toFixed(1)} | same client loop: one socket round trip vs FUSE's two requests |`);
    console.log(`\nraw p99 ${rawRand.lat.p99.toFixed(1)} µs vs swtpm p99 ${swtpmRand.lat.p99.toFixed(1)} µs: ${(rawRand.lat.p99 / swtpmRand.lat.p99).toFixed(2)}× (target ≤ 3×)`);
    console.log(`fuse-native GetRandom − canned floor: ${(natRand.lat.median - floor.lat.median).toFixed(1)} µs (target ≤ 40 µs)`);
    console.log('\n| per command | client CPU µs | server CPU µs | client switches | server switches |\n|---|---|---|---|---|');
    for (const [what, r] of [['swtpm TCP', swtpmRand], ['tpm0 raw (tpmfront + vtpmd)', rawRand], ['tpm0 raw, canned worker (FUSE alone)', fuseOnly], ['tpm0 raw, libtpms in the worker', engineInWorker], ['tpm0 fuse-native', natRand], ['fuse-native canned floor', floor]] as const) {
      console.log(`| ${what} | ${r.clientCpu.toFixed(1)} | ${r.serverCpu.toFixed(1)} | ${r.clientSwitches.toFixed(2)} | ${r.serverSwitches.toFixed(2)} |`);
    }

    tpmrmVsTpm0(client, keyClient, raw.node, pids(raw), N, 'one guest (raw front end + vtpmd)');
    tpmrmVsTpm0(client, keyClient, engineTpm0, [engineNode.pid!], N, 'a raw node with libtpms in its FUSE worker (no vtpmd)');
    if (process.env.VTPM_BENCH_TPMRM_ONLY) return; // just the resource manager's figures

    const wholeOurs = wholeProcess(['-T', `device:${raw.node}`]);
    const wholeSw = wholeProcess(['-T', `swtpm:host=127.0.0.1,port=${sw.port}`]);
    printTable('whole tpm2_getrandom 16 process (median of 30)', [
      { what: 'tpm2_getrandom via tpm0 (raw)', ours: wholeOurs, base: wholeSw, baseName: 'swtpm TCTI', target: 1.1 },
    ]);

    // Ten guests at once vs ten swtpm processes.
    const ten: Guest[] = [];
    for (let i = 0; i < 10; i++) ten.push(await start(`c${i}`, 'raw'));
    for (let i = 0; i < 9; i++) swtpms.push(await Swtpm.start('2.0'));
    const m = Math.max(500, Math.floor(N / 5));
    const tenNodes = ten.map((g) => ({ kind: 'dev' as const, target: g.node }));
    const tenSwtpm = swtpms.slice(0, 10).map((s) => ({ kind: 'tcp' as const, target: `127.0.0.1:${s.port}` }));
    // A first round warms both sides up (fresh guests' JIT, page faults); the second counts.
    const tenPids = ten.flatMap(pids);
    const swPids = swtpms.slice(0, 10).map((s) => s.proc.pid!);
    await concurrent(client, tenNodes, GETRANDOM, Math.floor(m / 2), tenPids);
    await concurrent(client, tenSwtpm, GETRANDOM, Math.floor(m / 2), swPids);
    const ours = await concurrent(client, tenNodes, GETRANDOM, m, tenPids);
    const sw10 = await concurrent(client, tenSwtpm, GETRANDOM, m, swPids);
    const tenCpu = () => ten.flatMap(pids).map(cpuUs);
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const afterBurst = tenCpu();
    await sleep(2000);
    const settledFrom = tenCpu();
    const burstCpu = settledFrom.reduce((s, c, i) => s + c - afterBurst[i]!, 0);
    await sleep(1000);
    const idleFrom = tenCpu();
    await sleep(5000);
    const idleCpu = tenCpu().reduce((s, c, i) => s + c - idleFrom[i]!, 0);
    console.log('\n## 10 guests at once (GetRandom, each its own client)\n');
    console.log('| | commands/s | ratio | context switches per command: clients | servers |\n|---|---|---|---|---|');
    console.log(`| 10 guests via tpm0 | ${ours.rate.toFixed(0)} | ${(ours.rate / sw10.rate).toFixed(2)} (target ≥ 1) | ${ours.clientSwitches.toFixed(2)} | ${ours.serverSwitches.toFixed(2)} |`);
    console.log(`| 10 swtpm over TCP | ${sw10.rate.toFixed(0)} | 1 | ${sw10.clientSwitches.toFixed(2)} | ${sw10.serverSwitches.toFixed(2)} |`);
    console.log(`\nCPU of the 10 guests' 20 processes, idle: ${(burstCpu / 1000).toFixed(1)} ms in the 2 s after the burst (V8 collecting), ${(idleCpu / 1000).toFixed(1)} ms in 5 s from 3 s after it (${(idleCpu / 50_000).toFixed(2)}% of a core)`);

    const gp = pids(raw).map(pssKb);
    const sp = pssKb(sw.proc.pid!);
    console.log('\n## memory (PSS, /proc/PID/smaps_rollup)\n');
    console.log('| process | PSS kB |\n|---|---|');
    console.log(`| tpmfront (raw) | ${gp[0]} |\n| vtpmd | ${gp[1]} |\n| one guest total | ${gp[0]! + gp[1]!} |\n| swtpm | ${sp} |`);
    console.log(`ratio one guest / swtpm: ${((gp[0]! + gp[1]!) / sp).toFixed(1)}×`);
  } finally {
    canned?.kill('SIGTERM');
    for (const h of helpers) h.kill('SIGTERM');
    for (const g of guests) await vtpm(['stop', g.name, ...run]).catch((e: Error) => console.error(`stop ${g.name}: ${e.message}`));
    for (const s of swtpms) await s.stop();
    await new Promise((r) => setTimeout(r, 200));
    spawnSync('umount', ['-l', join(dir, 'canned')]);
    if (hostUp) await vtpm(['host', 'stop', ...run]).catch((e: Error) => console.error(`stop host: ${e.message}`));
    rmSync(dir, { recursive: true, force: true });
    rmSync(client, { force: true });
    rmSync(keyClient, { force: true });
  }
}

if (isMain(import.meta.url)) await main();
