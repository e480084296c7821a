// frontd, the host's one front-end process, serving 10 guests at once, each with its own real
// vtpmd: every node answers tpm2-tools, a PCR extended in one guest is not seen in another,
// mounts spread over the FUSE threads, one guest detached or its vtpmd killed leaves the
// others answering, a handshake that times out fails that connect only, bad requests are
// refused with reasons, SIGTERM unmounts everything and exits 0, and a frontd killed with
// SIGKILL leaves dead mounts that its restart clears.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { builtScript } from '../../drivers/base/modules.ts';
import { RpcClient } from '../../drivers/base/rpc.ts';
import { startDaemon, stopProcess } from '../../drivers/host/daemon.ts';
import { FrontdClient, startFrontd, type GuestInfo } from '../../drivers/tpmfront/frontd-client.ts';
import { startFrontdHost, type FrontdGuest } from './frontd-host.ts';
import { rcOf, roundTrip } from './node-scenarios.ts';

const run = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const N = 10;

const mounted = (dir: string): boolean => readFileSync('/proc/mounts', 'utf8').includes(` ${dir} `);
const getrandom = async (node: string) => (await run('tpm2_getrandom', ['-T', `device:${node}`, '--hex', '16'], { timeout: 30_000 })).stdout.trim();

const host = await startFrontdHost('frontd', { threads: 2 });
t.teardown(() => host.stop());
const guests: FrontdGuest[] = [];

t.test(`${N} guests attached, connected and mounted by one process`, async (t) => {
  for (let i = 0; i < N; i++) guests.push(await host.addGuest(`g${i}`));
  const { guests: listed, load } = await host.client.status();
  t.equal(listed.length, N);
  t.ok(listed.every((g) => g.state === 'connected'), 'every guest connected');
  t.same(new Set(listed.map((g) => g.domid)).size, N, 'each guest its own domain');
  t.same(load, [N / 2, N / 2], 'mounts spread evenly over the two FUSE threads');
  for (const g of guests) {
    t.equal(statSync(g.node.path).mode & 0o777, 0o600, `${g.name}: tpm0 0600`);
    t.ok(g.node.rmPath && existsSync(g.node.rmPath), `${g.name}: tpmrm0 beside it`);
  }
});

t.test('every node answers tpm2-tools, all at once', async (t) => {
  const out = await Promise.all(guests.map((g) => getrandom(g.node.path)));
  for (const [i, r] of out.entries()) t.match(r, /^[0-9a-f]{32}$/, `${guests[i]!.name} answered`);
  const rm = await Promise.all(guests.map((g) => getrandom(g.node.rmPath!)));
  t.ok(rm.every((r) => /^[0-9a-f]{32}$/.test(r)), 'and every tpmrm0');
});

t.test('a PCR extended in one guest is not visible in another', async (t) => {
  const [a, b] = [guests[0]!, guests[1]!];
  const digest = createHash('sha256').update('frontd').digest('hex');
  await run('tpm2_pcrextend', ['-T', `device:${a.node.path}`, `16:sha256=${digest}`]);
  const expected = createHash('sha256').update(Buffer.alloc(32)).update(Buffer.from(digest, 'hex')).digest('hex');
  const pcrA = (await run('tpm2_pcrread', ['-T', `device:${a.node.path}`, 'sha256:16'])).stdout.toLowerCase();
  const pcrB = (await run('tpm2_pcrread', ['-T', `device:${b.node.path}`, 'sha256:16'])).stdout.toLowerCase();
  t.match(pcrA, new RegExp(`16\\s*:\\s*0x${expected}`), 'extended in its guest');
  t.match(pcrB, new RegExp(`16\\s*:\\s*0x${'0'.repeat(64)}`), 'still zero in the other');
});

t.test("one guest's tpm0 held open and busy does not hold the others", async (t) => {
  const g = guests[4]!;
  const fh = await open(g.node.path, 'r+');
  t.teardown(() => fh.close());
  await t.rejects(open(g.node.path, 'r+'), { code: 'EBUSY' }, 'a second opener of that node gets EBUSY');
  const others = await Promise.all(guests.filter((x) => x !== g).map((x) => open(x.node.path, 'r+')));
  t.equal(others.length, N - 1, 'every other node opens meanwhile');
  for (const o of others) {
    t.equal(rcOf(await roundTrip(o)), 0);
    await o.close();
  }
  t.equal(rcOf(await roundTrip(fh)), 0, 'and the held one still answers its opener');
});

t.test('a vtpmd that stops answering holds only the guests of its FUSE thread', async (t) => {
  const listed = (await host.client.status()).guests;
  const threadOf = (g: FrontdGuest) => listed.find((x) => x.name === g.name)?.thread;
  const slow = guests[5]!;
  const same = guests.find((g) => g !== slow && threadOf(g) === threadOf(slow))!;
  const other = guests.find((g) => threadOf(g) !== threadOf(slow))!;
  t.ok(same && other && threadOf(slow) !== undefined, `guests on thread ${threadOf(slow)} and on the other`);
  const once = async (g: FrontdGuest) => {
    const fh = await open(g.node.path, 'r+');
    try {
      return rcOf(await roundTrip(fh));
    } finally {
      await fh.close();
    }
  };
  process.kill(slow.vtpmd.pid, 'SIGSTOP');
  t.teardown(() => void process.kill(slow.vtpmd.pid, 'SIGCONT'));
  const pending = once(slow); // its READ waits on the stopped vtpmd, holding its thread
  await sleep(300);
  t.equal(await once(other), 0, 'a guest of the other thread answers meanwhile');
  const waiting = once(same);
  t.equal(await Promise.race([waiting.then(() => 'answered'), sleep(700).then(() => 'waiting')]), 'waiting', 'a guest of the same thread waits, as commands on one chip do');
  process.kill(slow.vtpmd.pid, 'SIGCONT');
  t.equal(await pending, 0, "the stopped vtpmd's command completes once it runs again");
  t.equal(await waiting, 0, 'and the guest that waited is answered');
});

t.test('a detached guest is gone; the others keep answering', async (t) => {
  const g = guests[2]!;
  const held = await open(guests[3]!.node.path, 'r+');
  await g.node.close();
  t.notOk(mounted(g.node.dir), 'its node is unmounted');
  t.notOk((await host.client.list()).some((x) => x.name === g.name), 'not listed');
  t.equal(rcOf(await roundTrip(held)), 0, 'a client holding another node meanwhile still gets answers');
  await held.close();
  for (const x of guests.filter((x) => x !== g)) t.match(await getrandom(x.node.path), /^[0-9a-f]{32}$/, `${x.name} answers`);
  await t.rejects(host.client.detach(g.name), { code: 'ENOENT' }, 'detaching it again: no such guest');
});

t.test('a killed vtpmd fails its own node only (EIO), the others answer', async (t) => {
  const g = guests[3]!;
  const fh = await open(g.node.path, 'r+');
  t.teardown(() => fh.close().catch(() => undefined));
  t.equal(rcOf(await roundTrip(fh)), 0);
  const told = new Promise<GuestInfo>((r) => host.client.onTrouble((info) => info.name === g.name && r(info)));
  process.kill(g.vtpmd.pid, 'SIGKILL');
  const t0 = performance.now();
  await t.rejects(roundTrip(fh), { code: 'EIO' }, 'its next command fails with EIO');
  t.ok(performance.now() - t0 < 10_000, 'promptly');
  for (const x of guests.filter((x) => x !== g && x !== guests[2])) t.match(await getrandom(x.node.path), /^[0-9a-f]{32}$/, `${x.name} answers`);
  const listed = (await host.client.list()).find((x) => x.name === g.name);
  t.equal(listed?.state, 'disconnected', 'frontd lists it as disconnected');
  t.match(listed?.why ?? '', /went away/);
  t.match(await told, { name: g.name, state: 'disconnected' }, 'and told its client with a guest event');
  await g.node.close();
  t.notOk(mounted(g.node.dir), 'detached: unmounted');
});

t.test('a handshake that times out fails that connect only; the guest can be detached', async (t) => {
  const domid = await host.client.attach('nobody');
  t.ok(domid > 0);
  await t.rejects(host.client.attach('nobody'), { code: 'EBUSY' }, 'attached twice: refused');
  const t0 = performance.now();
  await t.rejects(host.client.connect('nobody', 0x7000, 500), { code: 'ETIMEDOUT' }, 'no vtpmd at that domain');
  t.ok(performance.now() - t0 < 5000);
  t.equal((await host.client.list()).find((x) => x.name === 'nobody')?.state, 'attached', 'back to attached');
  t.match(await getrandom(guests[0]!.node.path), /^[0-9a-f]{32}$/, 'another guest answers meanwhile');
  await host.client.detach('nobody');
});

t.test('bad requests are refused with a reason, and frontd goes on', async (t) => {
  const c = host.client;
  await t.rejects(c.attach('Bad/Name'), { code: 'EINVAL', message: /field name/ });
  await t.rejects(c.connect('g0', -1), { code: 'EINVAL', message: /field backendId/ });
  await t.rejects(c.connect('g0', guests[0]!.vtpmd.info.domid as number), { code: 'EBUSY' }, 'connect of a connected guest');
  await t.rejects(c.connect('ghost', 5), { code: 'ENOENT' });
  const raw = await RpcClient.connect(host.frontd.socket, 'frontd');
  await t.rejects(raw.request('list', { frontd: 99 }), { code: 'EPROTO' }, 'another protocol version');
  await t.rejects(raw.request('format-disk', { frontd: 1 }), { code: 'EINVAL', message: /unknown operation/ });
  await raw.end();
  t.equal(statSync(host.frontd.socket).mode & 0o777, 0o600, 'socket 0600');
  t.match(await getrandom(guests[0]!.node.path), /^[0-9a-f]{32}$/);
});

t.test('SIGTERM: every node unmounted, exit 0; a SIGKILLed frontd leaves dead mounts its restart clears', async (t) => {
  const live = guests.filter((g) => g !== guests[2] && g !== guests[3]);
  const exited = host.frontd.exited;
  process.kill(host.frontd.pid, 'SIGTERM');
  t.same(await exited, { code: 0, signal: null }, 'frontd exited 0');
  for (const g of live) t.notOk(mounted(g.node.dir), `${g.name} unmounted`);

  // A new frontd, one guest with a new vtpmd, then SIGKILL: the mount stays, dead.
  const fd2 = await startFrontd(host.dir, { log: join(host.dir, 'frontd2.log'), script: builtScript('drivers/tpmfront/frontd') });
  const c2 = await FrontdClient.connect(fd2.socket);
  const domid = await c2.attach('k');
  const vtpmd = await startDaemon(builtScript('vtpmd/main'), ['--dir', host.dir, '--name', 'k', '--tpm', '2.0', '--front', String(domid)], { log: join(host.dir, 'vtpmd-k.log') });
  t.teardown(() => stopProcess(vtpmd.pid));
  const { node } = await c2.connect('k', Number(vtpmd.info.domid));
  t.match(await getrandom(node), /^[0-9a-f]{32}$/);
  const gone = fd2.exited;
  process.kill(fd2.pid, 'SIGKILL');
  await gone;
  const dir = join(host.dir, 'k', 'dev');
  t.ok(mounted(dir), 'the mount outlives the killed frontd');
  t.throws(() => statSync(node), { code: /ENOTCONN|ECONNABORTED/ }, 'dead: Transport endpoint is not connected');
  const fd3 = await startFrontd(host.dir, { log: join(host.dir, 'frontd3.log'), script: builtScript('drivers/tpmfront/frontd') });
  t.teardown(() => stopProcess(fd3.pid));
  t.notOk(mounted(dir), 'the restarted frontd cleared it');
  t.match(readFileSync(join(host.dir, 'frontd3.log'), 'utf8'), /cleared the dead mount at .*\/k\/dev/);
  t.equal(await stopProcess(fd3.pid), 'exited');
});
