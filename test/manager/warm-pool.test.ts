// The manager's warm pool (`vtpm host start --warm N`), as a user meets it: a start hands
// the instance to a vtpmd that was already waiting, the pool refills, the instance works and
// keeps its state as a cold one does, a waiting process that dies is replaced, --warm 0
// starts cold, and nothing of the pool outlives its manager.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { cmdline, processesOf, TestHost, transact, vtpm } from '../guest/host.ts';

interface Status {
  pid: number;
  warm: { size: number; pids: number[] };
}

async function status(host: TestHost): Promise<Status> {
  const r = await vtpm(['host', 'status', '--json', ...host.args]);
  if (r.code !== 0) throw new Error(`vtpm host status: ${r.stderr}`);
  return JSON.parse(r.stdout) as Status;
}

/** Until the pool holds `n` waiting processes (it fills in the background). */
async function poolHolds(host: TestHost, n: number, ms = 30_000): Promise<number[]> {
  for (const end = Date.now() + ms; ; ) {
    const st = await status(host);
    if (st.warm.pids.length === n) return st.warm.pids;
    if (Date.now() > end) throw new Error(`the warm pool holds ${st.warm.pids.length}, not ${n}, after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Live `vtpmd --warm` processes of this host's run dir. */
function warmProcesses(runDir: string): number[] {
  return processesOf(runDir).filter((pid) => {
    const c = cmdline(pid);
    return !!c && c.includes('--warm') && c.some((a) => a.endsWith('vtpmd/main.js') || a.endsWith('vtpmd/main.ts'));
  });
}

const pcr16 = (node: string) => Buffer.from(tpm2.parsePcrRead(transact(node, tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!).toString('hex');

t.test('a start takes a waiting vtpmd, the pool refills, the instance behaves as a cold one', async (t) => {
  const host = new TestHost(t, { warm: 2 });
  await host.hostStart();
  const st = await status(host);
  t.equal(st.warm.size, 2, 'host status shows the pool size asked for');
  const waiting = await poolHolds(host, 2);
  const node = await host.start(t, 'w1', '2.0');
  const row = await host.row('w1');
  t.ok(row.vtpmd && waiting.includes(row.vtpmd.pid), `the instance runs in a vtpmd that was waiting before the start (pid ${row.vtpmd?.pid}, waiting ${waiting.join(',')})`);
  const args = cmdline(row.vtpmd!.pid)!;
  t.ok(args.includes('--warm'), 'that process was started as a warm vtpmd');
  const refilled = await poolHolds(host, 2);
  t.notOk(refilled.includes(row.vtpmd!.pid), 'the pool refilled with other processes');

  tpm2.parsePcrExtend(transact(node, tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: createHash('sha256').update('warm').digest() }])));
  const extended = pcr16(node);
  t.not(extended, '0'.repeat(64), 'PCR 16 extended through the node');
  const log = readFileSync(`${host.dir}/w1/vtpmd.log`, 'utf8');
  t.match(log, /warm vtpmd \(domain \d+\) now serves instance w1/, "the taken process logs to the instance's log");
  t.match(log, /state link to the manager \(domain \d+\) connected while warm/, 'its state link was connected while it waited');

  // State across stop/start (the second start takes another warm process).
  const nvIndex = 0x01500031;
  const data = Buffer.from('kept across a warm start');
  const { tpm2Tools } = await import('../clients/tpm2-tools.ts');
  const c = tpm2Tools(t, `device:${node}`);
  await c.nvWrite(nvIndex, data);
  await host.stop(t, 'w1');
  const node2 = await host.start(t, 'w1', '2.0');
  const row2 = await host.row('w1');
  t.ok(refilled.includes(row2.vtpmd!.pid), 'the second start also ran in a waiting process');
  t.equal((await tpm2Tools(t, `device:${node2}`).nvRead(nvIndex, data.length)).toString(), data.toString(), 'NV written before the stop is back');
  t.equal(pcr16(node2), '0'.repeat(64), 'PCR 16 reset by the restart, as with a cold start');
});

t.test('a waiting process that dies is replaced; --warm 0 starts cold; the pool ends with its manager', async (t) => {
  const host = new TestHost(t, { warm: 1 });
  // Created (create runs the instance once to endorse it) and stopped first.
  await host.start(t, 'w2', '2.0');
  await host.stop(t, 'w2');
  const [first] = await poolHolds(host, 1);
  process.kill(first!, 'SIGKILL');
  const [second] = await poolHolds(host, 1);
  t.not(second, first, 'a killed waiting vtpmd is replaced by a new one');
  const node = await host.start(t, 'w2', '2.0');
  t.ok(pcr16(node), 'an instance starts on the replacement');
  t.equal((await host.row('w2')).vtpmd?.pid, second, 'and runs in it');

  // The manager killed: the waiting processes see their stdin close and exit (the running
  // instance's vtpmd stays: its guest keeps its TPM while the manager is away).
  const waiting = await poolHolds(host, 1);
  const st = await status(host);
  t.ok(waiting.every((p) => warmProcesses(host.dir).includes(p)), 'a warm vtpmd waits for this host');
  process.kill(st.pid, 'SIGKILL');
  const left = () => warmProcesses(host.dir).filter((p) => waiting.includes(p));
  for (const end = Date.now() + 10_000; left().length > 0 && Date.now() < end; ) await new Promise((r) => setTimeout(r, 100));
  t.same(left(), [], 'no waiting vtpmd outlives its manager');
  await host.restartAfterCrash(t);

  const cold = new TestHost(t, { warm: 0 });
  await cold.hostStart();
  t.same((await status(cold)).warm, { size: 0, pids: [] }, '--warm 0: no pool');
  await cold.start(t, 'c1', '2.0');
  const row = await cold.row('c1');
  t.notOk(cmdline(row.vtpmd!.pid)!.includes('--warm'), 'without a pool the instance starts in a new vtpmd');
});

t.test('--warm out of range is refused with one line', async (t) => {
  const host = new TestHost(t);
  for (const bad of ['-1', '65', 'two']) {
    const r = await vtpm(['host', 'start', '--state-dir', host.stateDir, '--hw', `tis:${host.hwDir}`, '--warm', bad, ...host.args]);
    t.not(r.code, 0, `--warm ${bad} refused`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'with one line');
    t.match(r.stderr, /warm/, 'naming the option');
  }
});
