// Grouped instances (`vtpm create NAME --group G`) through the CLI: the engines of a group
// run in one vtpmd process, each guest still its own TPM; a member stops, starts and
// suspends alone; killing the group's process restarts that group with every member's
// state intact and leaves other instances untouched.
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { cmdline, processesOf, TestHost, transact, vtpm } from '../guest/host.ts';

const pcr16 = (node: string) => Buffer.from(tpm2.parsePcrRead(transact(node, tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!).toString('hex');
const extend = (node: string, what: string) => tpm2.parsePcrExtend(transact(node, tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: createHash('sha256').update(what).digest() }])));
const ZERO = '0'.repeat(64);

async function create(t: Test, host: TestHost, name: string, group?: string): Promise<void> {
  const r = await vtpm(['create', name, ...(group ? ['--group', group] : []), '--json', ...host.args], 60_000);
  t.equal(r.code, 0, `create ${name}${r.code ? `: ${r.stderr}` : ''}`);
  if (group) t.equal(JSON.parse(r.stdout).group, group, `${name} is in group ${group}`);
}

async function start(t: Test, host: TestHost, name: string, verb = 'start'): Promise<string> {
  const r = await vtpm([verb, name, ...host.args], 120_000);
  t.equal(r.code, 0, `${verb} ${name}${r.code ? `: ${r.stderr}` : ''}`);
  return r.stdout.trim();
}

/** The pid of the host's authority (drivers/xen/authority.js --dir RUN). */
const findAuthority = (runDir: string): number => processesOf(runDir).find((p) => cmdline(p)?.some((a) => a.endsWith('drivers/xen/authority.js'))) ?? 0;

/** Running (a zombie left for a non-reaping init does not count). */
const alive = (pid: number) => {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2, st.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
};

async function answersAgain(node: string, ms: number): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; ) {
    try {
      tpm2.parseGetRandom(transact(node, tpm2.getRandom(8)));
      return true;
    } catch {
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  return false;
}

t.test('a group of three in one vtpmd, each its own TPM; members stop, start and suspend alone; the group process killed comes back whole', async (t) => {
  const host = new TestHost(t);
  await host.hostStart();
  for (const n of ['a1', 'a2', 'a3']) await create(t, host, n, 'tenant');
  await create(t, host, 'solo');
  const nodes: Record<string, string> = {};
  for (const n of ['a1', 'a2', 'a3', 'solo']) nodes[n] = await start(t, host, n);
  const rows = await host.list();
  const pid = (n: string) => rows.find((r) => r.name === n)?.vtpmd?.pid;
  t.ok(pid('a1') && pid('a1') === pid('a2') && pid('a2') === pid('a3'), `the group's members share one vtpmd process (pid ${pid('a1')})`);
  t.not(pid('solo'), pid('a1'), 'an instance without a group has its own');
  t.match(rows.find((r) => r.name === 'a1'), { group: 'tenant' }, 'vtpm list names the group');

  extend(nodes.a1!, 'only a1');
  t.not(pcr16(nodes.a1!), ZERO, 'a1 extended its PCR 16');
  t.equal(pcr16(nodes.a2!), ZERO, "a2's PCR 16 is untouched");
  t.equal(pcr16(nodes.a3!), ZERO, "a3's too");

  const data = Buffer.from('a2 keeps this');
  await tpm2Tools(t, `device:${nodes.a2}`).nvWrite(0x01500041, data);

  // One member stopped: the others answer; started again, its NV is back.
  t.equal((await vtpm(['stop', 'a2', ...host.args])).code, 0, 'stop a2');
  t.ok(await answersAgain(nodes.a1!, 5000), 'a1 answers while a2 is stopped');
  t.not(pcr16(nodes.a1!), ZERO, "and a1's PCR is still extended");
  await start(t, host, 'a2');
  t.equal((await tpm2Tools(t, `device:${nodes.a2}`).nvRead(0x01500041, data.length)).toString(), data.toString(), "a2's NV index is back after its stop/start");

  // Suspend/resume of a member keeps its running TPM.
  extend(nodes.a3!, 'a3 before suspend');
  const a3 = pcr16(nodes.a3!);
  t.equal((await vtpm(['suspend', 'a3', ...host.args])).code, 0, 'suspend a3');
  t.ok(await answersAgain(nodes.a1!, 5000), 'a1 answers while a3 is suspended');
  await start(t, host, 'a3', 'resume');
  t.equal(pcr16(nodes.a3!), a3, "a3's PCR 16 survived suspend/resume");

  // kill -9 of the group's process: its members restart with their state, the solo one is untouched.
  const soloPid = pid('solo');
  const group = pid('a1')!;
  process.kill(group, 'SIGKILL');
  for (const n of ['a1', 'a2', 'a3']) t.ok(await answersAgain(nodes[n]!, 30_000), `${n} answers again after the group process was killed`);
  const after = await host.list();
  const newPid = after.find((r) => r.name === 'a1')?.vtpmd?.pid;
  t.ok(newPid && newPid !== group, `a new group process serves them (pid ${newPid})`);
  t.equal(after.find((r) => r.name === 'a2')?.vtpmd?.pid, newPid, 'all of them');
  t.equal((await tpm2Tools(t, `device:${nodes.a2}`).nvRead(0x01500041, data.length)).toString(), data.toString(), "a2's NV index survived the kill");
  t.equal(after.find((r) => r.name === 'solo')?.vtpmd?.pid, soloPid, 'the instance outside the group kept its vtpmd');
  t.equal(after.find((r) => r.name === 'solo')?.restarts ?? 0, 0, 'and was not restarted');
});

t.test('the authority killed: grouped and isolated guests answer again by themselves, state intact, and the host stops cleanly', async (t) => {
  const host = new TestHost(t, { warm: 0 });
  await host.hostStart();
  await create(t, host, 'c1', 'auth');
  await create(t, host, 'c2', 'auth');
  await create(t, host, 'c3');
  const nodes: Record<string, string> = {};
  for (const n of ['c1', 'c2', 'c3']) nodes[n] = await start(t, host, n);
  for (const n of ['c1', 'c2', 'c3']) extend(nodes[n]!, n);
  const data = Buffer.from('kept across an authority restart');
  await tpm2Tools(t, `device:${nodes.c1}`).nvWrite(0x01500042, data);
  const authority = findAuthority(host.dir);
  t.ok(authority > 0, `the authority runs (pid ${authority})`);
  process.kill(authority, 'SIGKILL');
  // The data path does not need the authority, so an old node may answer for a moment:
  // wait until every guest has been brought up again on the new one.
  let rows = await host.list();
  for (const end = Date.now() + 20_000; Date.now() < end && !rows.every((r) => r.state === 'running' && (r.restarts ?? 0) > 0); rows = await host.list()) {
    await new Promise((r) => setTimeout(r, 250));
  }
  for (const n of ['c1', 'c2', 'c3']) {
    const row = rows.find((r) => r.name === n);
    t.ok(row?.state === 'running' && (row.restarts ?? 0) > 0, `${n} was restarted by itself (${row?.state}, ${row?.restarts} restarts)`);
    t.ok(await answersAgain(nodes[n]!, 10_000), `${n} answers again after kill -9 of the authority`);
  }
  t.equal((await tpm2Tools(t, `device:${nodes.c1}`).nvRead(0x01500042, data.length)).toString(), data.toString(), "c1's NV index survived");
  // The restart was a TPM reset (PCRs start afresh); the orderly shutdown on the way down
  // reached the manager (the old state thread serves the old links to their end).
  for (const n of ['c1', 'c2', 'c3']) t.equal(pcr16(nodes[n]!), ZERO, `${n}: PCR 16 reset, as after a reboot`);
  for (const n of ['c1', 'c2', 'c3']) {
    // TPMA_STARTUP_CLEAR.orderly: this start followed a TPM2_Shutdown that was stored.
    const yaml = (await tpm2Tools(t, `device:${nodes[n]}`).run('getcap', ['properties-variable'])).stdout;
    t.match(yaml, /orderly:\s*1\b/, `${n}: its stop on the way down was orderly (stored with the manager)`);
    t.match(yaml, /TPM2_PT_LOCKOUT_COUNTER:\s*(0x0|0)\b/, `${n}: lockout counter 0`);
  }
  // TestHost's teardown checks that `vtpm host stop` succeeds and leaves no process.
});

t.test('a group process a killed manager left is stopped by vtpm host stop', async (t) => {
  const host = new TestHost(t);
  await host.hostStart();
  await create(t, host, 'b1', 'left');
  await start(t, host, 'b1');
  const group = (await host.list()).find((r) => r.name === 'b1')?.vtpmd?.pid;
  t.ok(group && group > 0, `the group runs (pid ${group})`);
  const st = JSON.parse((await vtpm(['host', 'status', '--json', ...host.args])).stdout) as { pid: number };
  process.kill(st.pid, 'SIGKILL');
  await new Promise((r) => setTimeout(r, 500));
  t.ok(alive(group!), 'the group outlives its killed manager (its guest keeps its TPM)');
  const r = await vtpm(['host', 'stop', ...host.args], 120_000);
  t.equal(r.code, 0, `vtpm host stop${r.code ? `: ${r.stderr}` : ''}`);
  t.match(r.stdout, /vtpmd group process/, 'says it stopped the group process');
  t.notOk(alive(group!), 'and the group process is gone');
});

t.test('--group takes a plain name', async (t) => {
  const host = new TestHost(t);
  await host.hostStart();
  const r = await vtpm(['create', 'x1', '--group', 'Bad Group', ...host.args]);
  t.not(r.code, 0, 'refused');
  t.equal(r.stderr.trim().split('\n').length, 1, 'with one line');
  t.match(r.stderr, /group/);
});
