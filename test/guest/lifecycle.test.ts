// A guest's vTPM over its life, through the CLI and the node as users meet them (the host's
// manager: vtpm host start, create, start, stop): state across stop/start, two guests kept
// apart, tpm-dev rules at the node, and failure below the node turning into EIO (never a
// hang), with the manager restarting the failed piece.
import t from 'tap';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { closeSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, transact, vtpm } from './host.ts';

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest();

const errno = (fn: () => unknown): string | undefined => {
  try {
    fn();
    return undefined;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code;
  }
};

t.test('NV contents and a persistent key survive guest stop + start', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'keep', '2.0');
  const c = tpm2Tools(t, `device:${node}`);
  const secret = randomBytes(24);
  await c.nvWrite(0x01500020, secret);
  const pub = await c.persistKey(0x81000020);
  await host.stop(t, 'keep');
  const stopped = await host.row('keep');
  t.equal(stopped.state, 'stopped', 'a stopped guest is no longer listed as running');
  t.notOk(stopped.node ?? stopped.vtpmd ?? stopped.front, 'no node or pieces listed for it');
  await host.start(t, 'keep', '2.0');
  t.equal((await c.nvRead(0x01500020, secret.length)).toString('hex'), secret.toString('hex'), 'NV index content is back');
  const again = await c.readPersistent(0x81000020);
  t.equal(again?.toString('hex'), pub.toString('hex'), 'the persistent key is back, same public part');
  const r = await vtpm(['start', 'keep', ...host.args]);
  t.not(r.code, 0, 'starting a running guest again is refused');
  t.match(r.stderr, /already running/);
});

t.test('two guests: separate PCRs, separate vtpmds, a slow command in one does not delay the other', async (t) => {
  const host = new TestHost(t);
  const a = await host.start(t, 'ga', '2.0');
  const b = await host.start(t, 'gb', '2.0');
  const pcr = (node: string) => tpm2.parsePcrRead(transact(node, tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!;
  const bBefore = Buffer.from(pcr(b)).toString('hex');
  tpm2.parsePcrExtend(transact(a, tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: sha256(Buffer.from('only a')) }])));
  t.not(Buffer.from(pcr(a)).toString('hex'), bBefore, 'guest a moved its PCR 16');
  t.equal(Buffer.from(pcr(b)).toString('hex'), bBefore, "guest b's PCR 16 untouched");
  const list = await host.list();
  t.equal(new Set(list.map((g) => g.vtpmd?.pid)).size, 2, 'each guest has its own vtpmd');

  // RSA key generation in guest a (tens to hundreds of ms) while guest b answers GetRandom.
  const slow = spawn('tpm2_createprimary', ['-T', `device:${a}`, '-G', 'rsa2048', '-c', '/dev/null', '-Q'], { stdio: 'ignore' });
  const slowDone = new Promise<number>((r) => slow.once('exit', (code) => r(code ?? -1)));
  const times: number[] = [];
  let slowFinished = false;
  void slowDone.then(() => (slowFinished = true));
  while (!slowFinished && times.length < 2000) {
    const t0 = process.hrtime.bigint();
    tpm2.parseGetRandom(transact(b, tpm2.getRandom(8)));
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
    await new Promise((r) => setImmediate(r));
  }
  t.equal(await slowDone, 0, 'createprimary in guest a succeeded');
  t.ok(times.length > 3, `guest b answered ${times.length} commands while guest a generated a key`);
  t.ok(Math.max(...times) < 50, `guest b's slowest answer meanwhile: ${Math.max(...times).toFixed(1)} ms`);
});

t.test('tpm-dev rules at the node: one opener, whole commands, bad input refused, vtpmd survives', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'rules', '2.0');
  const fd = openSync(node, 'r+');
  t.equal(errno(() => closeSync(openSync(node, 'r+'))), 'EBUSY', 'a second opener gets EBUSY');
  const cases: [string, Buffer][] = [
    ['short write (5 bytes)', Buffer.from(tpm2.getRandom(8)).subarray(0, 5)],
    ['size field larger than the write', Buffer.from(tpm2.getRandom(8)).subarray(0, 11)],
    ['5000 bytes', Buffer.alloc(5000, 0x80)],
  ];
  // Over the 4096-byte buffer Linux's tpm-dev answers E2BIG, and so does the node.
  for (const [what, bytes] of cases) {
    const want = what === '5000 bytes' ? 'E2BIG' : 'EINVAL';
    t.equal(errno(() => writeSync(fd, bytes)), want, `${what}: ${want}`);
  }
  // Random bytes framed as a command reach the TPM, which answers with an error response.
  const junk = randomBytes(64);
  junk.writeUInt32BE(64, 2);
  writeSync(fd, junk);
  const rsp = Buffer.alloc(4096);
  const n = readSync(fd, rsp, 0, rsp.length, null);
  t.ok(n >= 10 && rsp.readUInt32BE(6) !== 0, `random command bytes: TPM error response 0x${rsp.readUInt32BE(6).toString(16)}`);
  t.equal(readSync(fd, rsp, 0, rsp.length, null), 0, 'nothing pending: read returns 0');
  writeSync(fd, tpm2.getRandom(8));
  t.equal(errno(() => writeSync(fd, tpm2.getRandom(8))), 'EBUSY', 'a write while a response is unread: EBUSY');
  const part = Buffer.alloc(4);
  t.equal(readSync(fd, part, 0, 4, null), 4, 'a short read gets what fits');
  const rest = Buffer.alloc(4096);
  const m = readSync(fd, rest, 0, rest.length, null);
  t.equal(4 + m, Buffer.concat([part, rest.subarray(0, m)]).readUInt32BE(2), '... and the rest on the next read');
  closeSync(fd);
  t.equal(tpm2.parseGetRandom(transact(node, tpm2.getRandom(16))).length, 16, 'the vTPM still answers after all that');
  // The write returns once the command is handed to vtpmd: close before its response is in,
  // and the next opener gets the answer to its own command, not the dropped one.
  const sizes: number[] = [];
  for (let i = 0; i < 20; i++) {
    const f = openSync(node, 'r+');
    writeSync(f, tpm2.getRandom(24));
    closeSync(f);
    sizes.push(tpm2.parseGetRandom(transact(node, tpm2.getRandom(8 + i))).length);
  }
  t.same(sizes, Array.from({ length: 20 }, (_, i) => 8 + i), 'closed 20 times with a command in flight: each next command gets its own response');
  let busy = 0;
  for (let i = 0; i < 100; i++) if (errno(() => transact(node, tpm2.getRandom(8))) === 'EBUSY') busy++;
  t.equal(busy, 0, 'close + reopen 100 times in a tight loop: never EBUSY');
});

t.test('vtpmd killed: the next write fails with EIO, no hang; the manager restarts it and the state is back', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'crash', '2.0');
  const c = tpm2Tools(t, `device:${node}`);
  const secret = randomBytes(16);
  await c.nvWrite(0x01500021, secret);
  const g = await host.row('crash');
  // The manager restarts a dead vtpmd, tearing the run's node down first: it is held (SIGSTOP)
  // until the failed command is seen, so what a client meets at the node is checked alone.
  const manager = Number(JSON.parse((await vtpm(['host', 'status', '--json', ...host.args])).stdout).pid);
  process.kill(manager, 'SIGSTOP');
  const resume = () => {
    try {
      process.kill(manager, 'SIGCONT');
    } catch {
      // already gone
    }
  };
  t.teardown(resume);
  process.kill(g.vtpmd!.pid, 'SIGKILL');
  const t0 = Date.now();
  const code = errno(() => transact(node, tpm2.getRandom(8)));
  t.equal(code, 'EIO', 'the command fails with EIO (at write, or at read when the write was already handed over)');
  t.ok(Date.now() - t0 < 10_000, `failed within ${Date.now() - t0} ms`);
  // The cause is reported in the front end's log (the host's front-end process: RUN/frontd.log), not swallowed.
  const frontLog = join(host.dir, 'frontd.log');
  let logged = '';
  for (let i = 0; i < 40 && !/backend failed/.test(logged); i++) {
    await new Promise((r) => setTimeout(r, 50));
    logged = readFileSync(frontLog, 'utf8');
  }
  t.match(logged, /guest-crash: tpm0: backend failed, the client gets EIO: .+/, 'frontd.log says why the command failed, naming the guest');
  resume();
  // The manager restarts the run (the old toolstack left it stopped until started again).
  const after = await host.row('crash');
  t.ok(after.state === 'restarting' || after.state === 'running', `guest listed as restarting or running (${after.state})`);
  t.match(after.reason, /vtpmd exited \(SIGKILL\)/, 'the listed reason names the kill');
  let answered = false;
  for (let i = 0; i < 200 && !answered; i++) {
    try {
      answered = tpm2.parseGetRandom(transact(node, tpm2.getRandom(8))).length === 8;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  t.ok(answered, 'the node answers again (within 10 s) without a vtpm start');
  const back = await host.row('crash');
  t.equal(back.state, 'running', 'listed as running again');
  t.not(back.vtpmd?.pid, g.vtpmd!.pid, 'a new vtpmd');
  t.equal((await c.nvRead(0x01500021, secret.length)).toString('hex'), secret.toString('hex'), 'persisted NV content is back');
});

t.test('the daemons run compiled JavaScript with lean V8 flags, and stay small', async (t) => {
  const host = new TestHost(t);
  // A user's NODE_OPTIONS applies to the CLI, not to the manager nor the guest's daemons.
  const env = { NODE_OPTIONS: '--max-old-space-size=999' };
  await host.hostStart(env);
  const c = await vtpm(['create', 'lean', '--tpm', '2.0', ...host.args], 60_000, env);
  t.equal(c.code, 0, `create${c.code ? `: ${c.stderr}` : ''}`);
  const r = await vtpm(['start', 'lean', ...host.args], 120_000, env);
  t.equal(r.code, 0, `start${r.code ? `: ${r.stderr}` : ''}`);
  const g = await host.row('lean');
  // vtpmd is one V8 isolate (~12 MB here; a second, an engine worker thread, added ~8 MB).
  const limits = [['frontd', g.front!.pid, 'build/drivers/tpmfront/frontd.js', 32], ['vtpmd', g.vtpmd!.pid, 'build/vtpmd/main.js', 16]] as const;
  for (const [what, pid, script, limitMb] of limits) {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    t.ok(argv.some((a) => a.endsWith(script)), `${what} runs ${script}`);
    t.notOk(argv.includes('tsx'), `${what} runs without tsx`);
    const env = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    t.notOk(env.some((e) => e.startsWith('NODE_OPTIONS=')), `${what} does not inherit the CLI's NODE_OPTIONS`);
    t.ok(argv.includes('--max-semi-space-size=1'), `${what} has a 1 MB young generation`);
    // Anonymous memory is what each guest adds (the node binary's pages are shared).
    const anonKb = Number(/^Pss_Anon:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1]);
    t.ok(anonKb > 0 && anonKb < limitMb * 1024, `${what}: ${anonKb} kB anonymous PSS (< ${limitMb} MB)`);
  }
});

t.test('CLI errors say what is wrong', async (t) => {
  const host = new TestHost(t);
  await host.hostStart();
  const bad = await vtpm(['create', 'Bad Name', ...host.args]);
  t.not(bad.code, 0);
  t.match(bad.stderr, /instance name/);
  const ver = await vtpm(['create', 'x', '--tpm', '3.0', ...host.args]);
  t.not(ver.code, 0);
  t.match(ver.stderr, /1\.2 or 2\.0/);
  const fuse = await vtpm(['start', 'x', '--fuse', 'fast', ...host.args]);
  t.not(fuse.code, 0);
  t.match(fuse.stderr, /raw or native/);
  const none = await vtpm(['stop', 'nobody', ...host.args]);
  t.not(none.code, 0);
  t.match(none.stderr, /no instance nobody/);
  const file = await vtpm(['host', 'start', '--run-dir', '/proc/version', '--state-dir', host.stateDir, '--hw', `tis:${host.hwDir}`]);
  t.not(file.code, 0);
  t.match(file.stderr, /unusable/);
});
