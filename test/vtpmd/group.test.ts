// The grouped vtpmd (vtpmd --group) through its users' interfaces: its control socket (the
// client the manager uses), real state links to a manager back end, and 10 guests whose
// tpm0 nodes are served by real tpmfront processes, driven with tpm2-tools.
import t from 'tap';
import { closeSync, openSync, readdirSync, readSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { alive } from '../../drivers/host/daemon.ts';
import { sha256, Tpm2Tools } from '../clients/tpm2-tools.ts';
import { scratchDir } from '../clients/run.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { groupFixture, type NodeGuest } from './group-fixture.ts';

const N = 10;
const fx = await groupFixture();
t.teardown(() => fx.done());

const tools = (g: NodeGuest, dir: string) => new Tpm2Tools(`device:${g.node}`, dir, { timeoutMs: 60_000 });
const expectPcr = (...digests: Buffer[]) => digests.reduce((pcr, d) => sha256(pcr, d), Buffer.alloc(32));
const digestOf = (s: string) => createHash('sha256').update(s).digest();

t.test(`${N} guests in one group: each answers, PCRs are each its own, one stops while the others answer, its state comes back`, async (t) => {
  const work = scratchDir(t, 'group-tools');
  const guests: NodeGuest[] = [];
  for (let i = 0; i < N; i++) guests.push(await fx.nodeGuest(`g${i}`));
  t.equal(new Set(guests.map((g) => g.domid)).size, N, 'each member has its own domain');
  const list = await fx.group.list();
  t.equal(list.length, N, 'list shows every member');
  t.ok(list.every((m) => m.phase === 'up' && m.guest), 'each up, with its guest connected');
  const perThread = [0, 1].map((th) => list.filter((m) => m.thread === th).length);
  t.same(perThread, [N / 2, N / 2], 'engines spread over the 2 threads (least loaded first)');
  const sock = statSync(fx.group.socket);
  t.equal(sock.mode & 0o777, 0o600, 'control socket is 0600');
  t.equal(statSync(join(fx.dir, 'groups')).mode & 0o777, 0o700, 'its dir is 0700');

  // every guest: random bytes, and an extend of PCR 16 with a value of its own
  for (const g of guests) {
    const tt = tools(g, work);
    t.equal((await tt.getRandom(16)).length, 16, `${g.name}: tpm2_getrandom`);
    await tt.pcrExtend(16, digestOf(g.name));
  }
  for (const g of guests) {
    const pcr = await tools(g, work).pcrRead(16);
    t.same(pcr, expectPcr(digestOf(g.name)), `${g.name}: PCR 16 holds its own extend only`);
  }

  // state kept across stop and add + link of the same instance: an NV index
  const g3 = guests[3]!;
  const secret = Buffer.from('kept across a stop of the member');
  await tools(g3, work).nvWrite(0x01500016, secret);
  await fx.stopFront(g3);
  await fx.group.stop(g3.name);
  t.notOk((await fx.group.list()).some((m) => m.name === g3.name), 'the stopped member left the list');
  t.ok(readdirSync(fx.manager.stateDir(g3.uuid)).includes('permall'), 'its state is with the manager');
  for (const g of guests) {
    if (g === g3) continue;
    t.equal((await tools(g, work).getRandom(8)).length, 8, `${g.name} still answers after ${g3.name} stopped`);
  }
  const back = await fx.nodeGuest(g3.name, '2.0', g3.uuid);
  guests[3] = back;
  t.same(await tools(back, work).nvRead(0x01500016, secret.length), secret, 'the NV index came back with the same instance');
  t.same(await tools(back, work).pcrRead(16), Buffer.alloc(32), 'its PCRs started afresh (an orderly stop and a new boot)');
  t.same(await tools(guests[4]!, work).pcrRead(16), expectPcr(digestOf('g4')), 'a neighbour kept its PCRs');
});

t.test('a guest whose front end dies, and an instance whose store fails, disturb nobody else', async (t) => {
  const work = scratchDir(t, 'group-fail');
  const members = (await fx.group.list()).map((m) => m.name);
  const guests = await Promise.all(['f0', 'f1', 'f2'].map((n) => fx.nodeGuest(n)));
  process.kill(guests[0]!.front.pid, 'SIGKILL');
  fx.manager.failStores(guests[1]!.uuid);
  // f1's TPM cannot store: a command that writes NV fails, and is not acknowledged
  const tf1 = tools(guests[1]!, work);
  const nv = await tf1.run('nvdefine', ['0x01500020', '-C', 'o', '-s', '8', '-a', 'ownerread|ownerwrite']).then(() => 'ok', (e: Error) => e.message);
  t.not(nv, 'ok', 'f1: an NV define whose store fails is refused');
  t.equal((await tools(guests[2]!, work).getRandom(8)).length, 8, 'f2 answers');
  for (const name of members) t.ok((await fx.group.list()).some((m) => m.name === name && m.phase === 'up'), `${name} still up`);
  for (const g of guests) await fx.group.stop(g.name);
  t.ok(alive(fx.group.pid), 'the group process lives on');
});

t.test('kill -9 of the group process: every member’s node fails with EIO', async (t) => {
  const nodes = (await fx.group.list()).map((m) => join(fx.dir, m.name, 'dev', 'tpm0'));
  t.ok(nodes.length >= N, `${nodes.length} members`);
  process.kill(fx.group.pid, 'SIGKILL');
  await fx.group.exited;
  for (const node of nodes) {
    const err = (() => {
      const fd = openSync(node, 'r+');
      try {
        // the write is taken (as by /dev/tpm0); the failure comes with the response
        writeSync(fd, tpm2.getRandom(8));
        readSync(fd, Buffer.alloc(4096), 0, 4096, null);
        return 'answered';
      } catch (e) {
        return (e as NodeJS.ErrnoException).code;
      } finally {
        closeSync(fd);
      }
    })();
    t.equal(err, 'EIO', `${node}: EIO`);
  }
});
