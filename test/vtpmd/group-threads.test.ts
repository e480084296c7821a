// The grouped vtpmd's engine threads: a slow command (RSA 2048 key generation) in one
// engine does not stall the engines of the other thread; what guests on the same thread
// see is measured and printed. Also: suspend keeps a member's running TPM (PCRs) for its
// next add + link, and SIGTERM stops every member orderly with exit 0. Guests here are
// front ends in this process (raw commands over the shared page).
import t from 'tap';
import { randomBytes, randomUUID } from 'node:crypto';
import { RpcClient } from '../../drivers/base/rpc.ts';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { buildCommand, parseResponse } from '../../drivers/tpm/command.ts';
import { Writer } from '../../drivers/tpm/marshal.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { groupFixture, type LocalGuest } from './group-fixture.ts';

const fx = await groupFixture({ threads: 2 });
t.teardown(() => fx.done());

/** TPM2_CreatePrimary of an RSA 2048 storage key under the owner hierarchy, with a unique
 *  field of its own (so no two calls derive the same key). */
function createRsaPrimary(unique: Uint8Array): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.CreatePrimary, (w) => {
    w.u32(0x40000001); // TPM_RH_OWNER
    tpm2.writePasswordAuth(w);
    w.u16(4).u16(0).u16(0); // inSensitive: empty userAuth, empty data
    const p = new Writer(512);
    {
      p.u16(0x0001).u16(0x000b).u32(0x00030072); // RSA, SHA-256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
      p.u16(0); // authPolicy
      p.u16(0x0006).u16(128).u16(0x0043); // AES-128-CFB
      p.u16(0x0010).u16(2048).u32(0); // no scheme, 2048 bits, default exponent
      p.sized16(unique);
    }
    w.sized16(p.finish());
    w.u16(0).u32(0); // outsideInfo, creationPCR
  });
}
const handleOf = (rsp: Uint8Array) => new DataView(rsp.buffer, rsp.byteOffset).getUint32(10);
const flush = (h: number) => buildCommand(tpm2.TPM_ST_NO_SESSIONS, tpm2.TPM_CC.FlushContext, (w) => w.u32(h));

async function timed(g: LocalGuest, cmd: Uint8Array): Promise<{ rsp: Uint8Array; start: number; end: number }> {
  const start = performance.now();
  const rsp = await g.link.front.send(cmd, 0, 120_000);
  return { rsp, start, end: performance.now() };
}

t.test('the control socket checks every request and names what it refused', async (t) => {
  const rpc = await RpcClient.connect(fx.group.socket, 'the group');
  t.teardown(() => rpc.end());
  const ask = (op: string, args: Record<string, unknown>) => rpc.request(op, args, 10_000).then(() => 'ok', (e: { code: string; message: string }) => `${e.code}: ${e.message}`);
  const uuid = randomUUID();
  t.match(await ask('list', {}), /^EPROTO: group control version/, 'no version field: refused');
  t.match(await ask('format', { group: 1 }), /^EINVAL: unknown operation/, 'unknown op');
  t.match(await ask('add', { group: 1, name: '../x', tpm: '2.0', uuid }), /^EINVAL: field name/, 'a name that is not an instance name');
  t.match(await ask('add', { group: 1, name: 'x', tpm: '3.0', uuid }), /^EINVAL: field tpm/, 'a TPM version that does not exist');
  t.match(await ask('add', { group: 1, name: 'x', tpm: '2.0', uuid: 'not-a-uuid' }), /^EINVAL: field uuid/, 'a uuid that is not one');
  t.match(await ask('link', { group: 1, name: 'nobody', manager: 0, front: 1 }), /^ENOENT: no member nobody/, 'link of a non-member');
  t.equal(await ask('add', { group: 1, name: 'x', tpm: '2.0', uuid }), 'ok', 'a good add');
  t.match(await ask('add', { group: 1, name: 'x', tpm: '2.0', uuid }), /^EBUSY: x is already a member/, 'the same name twice');
  t.match(await ask('link', { group: 1, name: 'x', manager: 70000, front: 1 }), /^EINVAL: field manager/, 'a domid out of range');
  t.match(await ask('suspend', { group: 1, name: 'x' }), /^EBUSY: x is added, not running/, 'suspend of a member not linked');
  t.equal(await ask('stop', { group: 1, name: 'x' }), 'ok', 'a member never linked stops (its domain left)');
  t.same(await fx.group.list(), [], 'and is gone');
});

t.test('RSA 2048 key generation in one engine: the other thread’s engines keep answering', async (t) => {
  const slow = await fx.localGuest('slow');
  const other = await fx.localGuest('other');
  const same = await fx.localGuest('same');
  t.equal(slow.thread, 0, 'the first engine on thread 0');
  t.equal(other.thread, 1, 'the second engine went to the less loaded thread');
  t.equal(same.thread, 0, 'the third to thread 0 (both held one)');
  for (const g of [slow, other, same]) tpm2.parseGetRandom(await g.link.front.send(tpm2.getRandom(8)));

  const KEYS = 6;
  const keygen = (async () => {
    const spans: number[] = [];
    for (let i = 0; i < KEYS; i++) {
      const r = await timed(slow, createRsaPrimary(randomBytes(32)));
      t.equal(parseResponse(r.rsp, '2.0', false).rc, 0, `CreatePrimary RSA 2048 #${i + 1}`);
      spans.push(r.end - r.start);
      await slow.link.front.send(flush(handleOf(r.rsp)));
    }
    return spans;
  })();
  let keygenDone = false;
  void keygen.finally(() => (keygenDone = true));
  // the other thread's engine: GetRandom after GetRandom while the keys are generated
  const otherLatencies: number[] = [];
  let sameLatency = -1;
  while (!keygenDone) {
    const r = await timed(other, tpm2.getRandom(16));
    tpm2.parseGetRandom(r.rsp);
    if (!keygenDone) otherLatencies.push(r.end - r.start);
    // once, mid-way: a command of the engine sharing the slow engine's thread
    if (otherLatencies.length === 20 && sameLatency < 0) {
      void timed(same, tpm2.getRandom(16)).then((s) => (sameLatency = s.end - s.start));
    }
  }
  const spans = await keygen;
  while (sameLatency < 0) await new Promise((r) => setTimeout(r, 10));
  const total = spans.reduce((a, b) => a + b, 0);
  const sorted = [...otherLatencies].sort((a, b) => a - b);
  const p50 = sorted[Math.floor(sorted.length / 2)] ?? NaN;
  const max = sorted[sorted.length - 1] ?? NaN;
  t.comment(`RSA 2048 CreatePrimary on thread 0: ${spans.map((s) => s.toFixed(0)).join(', ')} ms (${total.toFixed(0)} ms in all)`);
  t.comment(`other thread, meanwhile: ${otherLatencies.length} GetRandoms, p50 ${p50.toFixed(2)} ms, max ${max.toFixed(1)} ms`);
  t.comment(`same thread: one GetRandom sent mid-way took ${sameLatency.toFixed(0)} ms (it waits for the key generation in flight)`);
  t.ok(otherLatencies.length >= 20, `the other thread answered ${otherLatencies.length} commands during the key generation`);
  t.ok(max < Math.max(...spans), 'no command of the other thread waited as long as one key generation');
  for (const g of [slow, other, same]) await fx.group.stop(g.name);
});

t.test('suspend keeps the running TPM (PCRs) for the next add + link; SIGTERM stops every member with exit 0', async (t) => {
  const a = await fx.localGuest('sus');
  const b = await fx.localGuest('bystander');
  const old = await fx.localGuest('tpm12', '1.2');
  t.equal(tpm12.parseGetRandom(await old.link.front.send(tpm12.getRandom(16))).length, 16, 'a TPM 1.2 member answers beside the 2.0 ones');
  const digest = randomBytes(32);
  tpm2.parsePcrExtend(await a.link.front.send(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }])));
  const pcrOf = async (g: LocalGuest) => Buffer.from(tpm2.parsePcrRead(await g.link.front.send(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!);
  const before = await pcrOf(a);
  const bytes = await fx.group.suspend(a.name);
  t.ok(bytes > 1000, `suspend stored ${bytes} bytes of volatile state`);
  t.ok(existsSync(join(fx.manager.stateDir(a.uuid), 'volatilestate')), 'as volatilestate, with the manager');
  await t.rejects(a.link.front.send(tpm2.getRandom(8), 0, 5000), 'the suspended guest gets no answers');
  t.equal(tpm2.parseGetRandom(await b.link.front.send(tpm2.getRandom(8))).length, 8, 'a bystander still answers');
  await a.close();
  const again = await fx.localGuest(a.name, '2.0', a.uuid);
  t.same(await pcrOf(again), before, 'resumed: PCR 16 as it was when suspended');
  t.notOk(existsSync(join(fx.manager.stateDir(a.uuid), 'volatilestate')), 'the volatile state was used once');

  t.equal(await fx.group.shutdown(), 'exited', 'SIGTERM: the group exits by itself');
  t.same(await fx.group.exited, { code: 0, signal: null }, 'with code 0');
  const log = fx.log();
  for (const [name, v] of [[again.name, '2.0'], [b.name, '2.0'], [old.name, '1.2']]) t.match(log, new RegExp(`${name}: TPM ${v.replace('.', '\\.')} shut down \\(orderly\\)`), `${name} (TPM ${v}) shut down orderly`);
});
