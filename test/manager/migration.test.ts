// Migration between two hosts, each a network namespace with its own manager, modelled
// hardware TPM and state dir, joined only through a relay this test runs (the untrusted
// network: it can flip, cut, hold and replay). Everything through the CLI, as a user
// migrates; the guests checked with tpm2-tools / tpm-tools on the destination's node.
// After every refusal exactly one host can start the instance.
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { FrameReader, type Msg } from '../../drivers/base/frame.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import { Tpm12Tools } from '../clients/tpm12-battery.ts';
import { runTool, scratchDir } from '../clients/run.ts';
import { startTcsd } from '../clients/tcsd.ts';
import { sha256, tpm2Tools, type Tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, transact, vtpm } from '../guest/host.ts';
import { makeHostNets } from './netns.ts';
import { startRelay, type Relay } from './relay.ts';

const PORT = 7711;
const PCR = 16;

interface World {
  A: TestHost;
  B: TestHost;
  C: TestHost;
  toB: Relay;
  toC: Relay;
  bAddr: { host: string; port: number };
}

async function identityFile(t: Test, h: TestHost, name: string): Promise<string> {
  const file = join(scratchDir(t, 'id'), `${name}.id`);
  const r = await vtpm(['host', 'identity', '--out', file, ...h.args]);
  t.equal(r.code, 0, `vtpm host identity of ${name}${r.code ? `: ${r.stderr}` : ''}`);
  return file;
}

async function trust(t: Test, h: TestHost, name: string, file: string): Promise<void> {
  const r = await vtpm(['host', 'trust', 'add', name, file, ...h.args]);
  t.equal(r.code, 0, `trust add ${name}${r.code ? `: ${r.stderr}` : ''}`);
}

const migrate = (h: TestHost, name: string, to: string) => vtpm(['migrate', name, '--to', to, '--json', ...h.args], 180_000);

async function state(h: TestHost, name: string): Promise<string | undefined> {
  return (await h.list()).find((i) => i.name === name)?.state;
}

/** Wait (bounded) until `name` on `h` is in `want` (settling runs in the background). */
async function waitState(h: TestHost, name: string, want: (s: string | undefined) => boolean, ms = 90_000): Promise<string | undefined> {
  const end = Date.now() + ms;
  let s = await state(h, name);
  while (!want(s) && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 500));
    s = await state(h, name);
  }
  return s;
}

/** Exactly one host has the instance and can run it; the other has no record of it. */
async function onlyOn(t: Test, name: string, here: TestHost, there: TestHost): Promise<string> {
  t.equal(await state(there, name), undefined, `${name} is gone from the other host`);
  let s = await state(here, name);
  if (s === 'suspended' || s === 'stopped') {
    const r = await vtpm([s === 'suspended' ? 'resume' : 'start', name, ...here.args], 120_000);
    t.equal(r.code, 0, `${name} starts again where it is${r.code ? `: ${r.stderr}` : ''}`);
    s = await state(here, name);
  }
  t.equal(s, 'running', `${name} runs on exactly one host`);
  return join(here.dir, name, 'dev', 'tpm0');
}

/** A TPM 2.0 guest on A with PCR 16 extended; returns its value and the tools on A's node. */
async function guest20(t: Test, w: World, name: string): Promise<{ pcr: Buffer; tools: Tpm2Tools }> {
  const node = await w.A.start(t, name, '2.0');
  const tools = tpm2Tools(t, `device:${node}`);
  await tools.pcrExtend(PCR, sha256(Buffer.from(`guest ${name}`)));
  return { pcr: await tools.pcrRead(PCR), tools };
}

async function pcrOn(t: Test, node: string): Promise<string> {
  return (await tpm2Tools(t, `device:${node}`).pcrRead(PCR)).toString('hex');
}

t.test('migration between two namespaced hosts', async (t) => {
  const nets = makeHostNets(t, 3);
  const A = new TestHost(t, { netns: nets[0]!.ns });
  const B = new TestHost(t, { netns: nets[1]!.ns, listen: `${nets[1]!.ip}:${PORT}` });
  const C = new TestHost(t, { netns: nets[2]!.ns, listen: `${nets[2]!.ip}:${PORT}` });
  await Promise.all([A.hostStart(), B.hostStart(), C.hostStart()]);
  const toB = await startRelay(t, { host: nets[0]!.peerIp, port: PORT }, { host: nets[1]!.ip, port: PORT });
  const toC = await startRelay(t, { host: nets[0]!.peerIp, port: PORT + 1 }, { host: nets[2]!.ip, port: PORT });
  const w: World = { A, B, C, toB, toC, bAddr: { host: nets[1]!.ip, port: PORT } };
  const [idA, idB, idC] = [await identityFile(t, A, 'a'), await identityFile(t, B, 'b'), await identityFile(t, C, 'c')];
  await trust(t, A, 'b', idB);
  await trust(t, B, 'a', idA);

  const direct = await runTool('nsenter', [`--net=/run/netns/${nets[0]!.ns}`, 'bash', '-c', `exec 3<>/dev/tcp/${nets[1]!.ip}/${PORT}`], { timeoutMs: 5000 }).catch(() => null);
  t.not(direct?.code ?? 1, 0, 'host A cannot reach host B except through the relay');

  await t.test('TPM 2.0: a loaded key, PCRs and NV move; the key signs on the destination', async (t) => {
    const { pcr, tools } = await guest20(t, w, 'm20');
    await tools.nvWrite(0x01500020, Buffer.from('written before migration'));
    const primary = tools.file('primary.ctx');
    await tools.run('createprimary', ['-C', 'o', '-G', 'ecc256', '-a', 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign', '-c', primary, '-Q']);
    const [handle] = await tools.handles('transient');
    const pem = tools.file('key.pem');
    await tools.run('readpublic', ['-c', `0x${handle!.toString(16)}`, '-o', pem, '-f', 'pem', '-Q']);
    const r = await migrate(A, 'm20', toB.address);
    t.equal(r.code, 0, `vtpm migrate${r.code ? `: ${r.stderr}` : ''}`);
    const sum = JSON.parse(r.stdout || '{}');
    t.equal(sum.peer, 'b', 'the summary names the trusted destination');
    t.ok(sum.bytes > 0 && sum.ms > 0, `${sum.bytes} bytes in ${sum.ms} ms`);
    const node = await onlyOn(t, 'm20', B, A);
    t.equal(await pcrOn(t, node), pcr.toString('hex'), 'PCR 16 equal on the destination');
    const there = tpm2Tools(t, `device:${node}`);
    t.equal((await there.nvRead(0x01500020, 24)).toString(), 'written before migration', 'NV index content moved');
    t.same(await there.handles('transient'), [handle], 'the key loaded before migration is loaded there');
    const msg = there.writeFile('msg', 'signed on host B');
    const sig = there.file('sig');
    await there.run('sign', ['-c', `0x${handle!.toString(16)}`, '-g', 'sha256', '-f', 'plain', '-o', sig, msg]);
    const v = await runTool('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', sig, msg]);
    t.equal(v.code, 0, 'its signature verifies with the public key read on host A');
    t.equal((await B.row('m20')).uuid, sum.uuid, 'same uuid, same guest name on the destination');
  });

  await t.test('TPM 1.2: the SRK (owner state) and PCRs move; data sealed on A unseals on B', async (t) => {
    const node = await A.start(t, 'm12', '1.2');
    transact(node, tpm12.extend(PCR, createHash('sha1').update('tpm 1.2 guest').digest()));
    const pcr = Buffer.from(tpm12.parsePcrRead(transact(node, tpm12.pcrRead(PCR)))).toString('hex');
    const tcsd = await startTcsd(t, { node });
    const tools = new Tpm12Tools(tcsd, 60_000);
    // A TPM 1.2 instance gets its EK when it is created (and its certificate): only an
    // instance without one needs tpm_createek.
    if ((await tools.try('tpm_getpubek', [])).code !== 0) await tools.run('tpm_createek', []);
    await tools.run('tpm_takeownership', ['-y', '-z']);
    const secret = Buffer.from('sealed to the SRK and PCR 16 on host A');
    const sealed = tools.file('sealed');
    await tools.run('tpm_sealdata', ['-i', tools.writeFile('secret', secret), '-o', sealed, '-z', '-p', String(PCR)]);
    await tcsd.stop();
    const systemPs = readFileSync(tcsd.systemPsFile); // the guest's disk moves with it
    const r = await migrate(A, 'm12', toB.address);
    t.equal(r.code, 0, `vtpm migrate${r.code ? `: ${r.stderr}` : ''}`);
    const there = await onlyOn(t, 'm12', B, A);
    t.equal(Buffer.from(tpm12.parsePcrRead(transact(there, tpm12.pcrRead(PCR)))).toString('hex'), pcr, 'PCR 16 equal on B');
    const tcsdB = await startTcsd(t, { node: there }, { systemPs });
    const toolsB = new Tpm12Tools(tcsdB, 60_000);
    const out = toolsB.file('unsealed');
    const copy = toolsB.writeFile('sealed', readFileSync(sealed));
    const un = await toolsB.try('tpm_unsealdata', ['-i', copy, '-o', out, '-z']);
    t.equal(un.code, 0, `tpm_unsealdata on B${un.code ? `: ${un.stdout}${un.stderr}` : ''}`);
    t.equal(readFileSync(out).toString(), secret.toString(), 'the blob sealed on A unseals on B');
    await tcsdB.stop();
  });

  await t.test('refused: the destination is not trusted by the source; nothing is sent', async (t) => {
    const { pcr } = await guest20(t, w, 'r-untrusted');
    const before = toC.connections;
    const r = await migrate(A, 'r-untrusted', toC.address);
    t.not(r.code, 0, 'migrate fails');
    t.match(r.stderr, /not a trusted host here: vtpm host trust add/, 'saying the destination is not trusted, and how to trust it');
    t.equal(toC.connections, before + 1, 'one connection (the hello), nothing more');
    t.ok(toC.recorded.at(-1)!.length < 200, `the source sent ${toC.recorded.at(-1)!.length} bytes (its refusal), no offer`);
    t.notOk((await C.list()).length, 'C received nothing');
    const node = await onlyOn(t, 'r-untrusted', A, C);
    t.equal(await pcrOn(t, node), pcr.toString('hex'), 'still running on A, PCR as it was');
  });

  await trust(t, A, 'c', idC);
  await t.test('refused: the destination does not trust the source; the source stays resumable', async (t) => {
    const { pcr } = await guest20(t, w, 'r-notrusted');
    const r = await migrate(A, 'r-notrusted', toC.address);
    t.not(r.code, 0, 'migrate fails');
    t.match(r.stderr, /not trusted here/, 'with the destination\'s reason');
    t.match(r.stderr, /does not have it, so it stays here: vtpm resume r-notrusted/, 'and the source keeps it');
    const node = await onlyOn(t, 'r-notrusted', A, C);
    t.equal(await pcrOn(t, node), pcr.toString('hex'), 'resumed on A with its PCR');
  });

  for (const [what, at] of [['in the offer (identity, signature)', 200], ['in the ciphertext', 3000]] as const) {
    await t.test(`refused: one byte of the stream flipped ${what}`, async (t) => {
      const name = `r-flip${at}`;
      const { pcr } = await guest20(t, w, name);
      toB.plan({ flipAt: at });
      const r = await migrate(A, name, toB.address);
      t.not(r.code, 0, 'migrate fails');
      t.match(r.stderr, /signature|authentication|identity|certif/, `the destination names the broken check: ${r.stderr.trim().slice(0, 160)}`);
      const node = await onlyOn(t, name, A, B);
      t.equal(await pcrOn(t, node), pcr.toString('hex'), 'resumed on A with its PCR');
    });
  }

  await t.test('refused: an old stream replayed to the destination', async (t) => {
    await guest20(t, w, 'r-replay');
    const r = await migrate(A, 'r-replay', toB.address);
    t.equal(r.code, 0, 'a first, good migration (recorded by the relay)');
    const stream = toB.recorded.at(-1)!;
    // Put the world back as if B never had it: stop and destroy there, then replay.
    t.equal((await vtpm(['stop', 'r-replay', ...B.args], 60_000)).code, 0, 'stopped on B');
    t.equal((await vtpm(['destroy', 'r-replay', ...B.args])).code, 0, 'destroyed on B');
    const replies = await replay(w.bAddr, stream);
    t.equal(replies[0]?.t, 'hello', 'B greets the replayer with a fresh nonce');
    t.equal(replies.at(-1)?.t, 'abort', 'and refuses the stream');
    t.match(String(replies.at(-1)?.msg), /signature/, `because the signature does not cover its nonce: ${String(replies.at(-1)?.msg).slice(0, 120)}`);
    t.equal(await state(B, 'r-replay'), undefined, 'B has no instance from the replay');
  });

  for (const [what, plan] of [
    ['before the offer is complete', { cutAt: 100 }],
    ['mid-ciphertext', { cutAt: 4000 }],
  ] as const) {
    await t.test(`cut ${what}: the source keeps it`, async (t) => {
      const name = `c-${plan.cutAt}`;
      const { pcr } = await guest20(t, w, name);
      toB.plan(plan);
      const r = await migrate(A, name, toB.address);
      t.not(r.code, 0, `migrate fails: ${r.stderr.trim().slice(0, 200)}`);
      const node = await onlyOn(t, name, A, B);
      t.equal(await pcrOn(t, node), pcr.toString('hex'), 'resumed on A with its PCR');
    });
  }

  await t.test('cut after the destination imported (the ack is lost): the source learns it moved', async (t) => {
    const { pcr } = await guest20(t, w, 'c-ack');
    toB.plan({ cutAfterHello: true });
    const r = await migrate(A, 'c-ack', toB.address);
    t.equal(r.code, 0, `migrate settles it (the destination's signed answer)${r.code ? `: ${r.stderr}` : ''}`);
    const node = await onlyOn(t, 'c-ack', B, A);
    t.equal(await pcrOn(t, node), pcr.toString('hex'), 'running on B with its PCR');
  });

  await t.test('the source manager killed (-9) mid-stream: after its restart the instance is back on A', async (t) => {
    const { pcr } = await guest20(t, w, 'k-src');
    toB.plan({ holdAt: 3000 });
    const m = migrate(A, 'k-src', toB.address);
    await toB.held();
    const pid = Number(JSON.parse((await vtpm(['host', 'status', '--json', ...A.args])).stdout).pid);
    process.kill(pid, 'SIGKILL');
    toB.cutHeld();
    t.not((await m).code, 0, 'the migrate command fails with its manager');
    await A.restartAfterCrash(t);
    const s = await waitState(A, 'k-src', (s) => s !== 'migrating');
    t.equal(s, 'suspended', 'settled with B after the restart: not there, so unlocked here');
    const node = await onlyOn(t, 'k-src', A, B);
    t.equal(await pcrOn(t, node), pcr.toString('hex'), 'resumed on A with its PCR');
  });

  await t.test('the destination manager killed (-9) after importing, before acknowledging', async (t) => {
    const { tools } = await guest20(t, w, 'k-dst');
    await tools.nvWrite(0x01500021, Buffer.from('kept across both crashes'));
    // The ack never passes, nor A's questions, until B has been killed and restarted.
    toB.plan({ cutAfterHello: true, thenRefuse: true });
    const pidB = Number(JSON.parse((await vtpm(['host', 'status', '--json', ...B.args])).stdout).pid);
    const m = migrate(A, 'k-dst', toB.address);
    const s = await waitState(B, 'k-dst', (s) => s === 'running', 60_000);
    t.equal(s, 'running', 'B imported and started it');
    const r = await m;
    t.not(r.code, 0, 'migrate cannot settle while B cannot be asked');
    t.match(r.stderr, /outcome is not known yet/, 'and says the outcome is pending');
    t.equal(await state(A, 'k-dst'), 'migrating', 'A keeps it locked (migrating)');
    const start = await vtpm(['resume', 'k-dst', ...A.args]);
    t.not(start.code, 0, 'resume on A is refused meanwhile');
    t.match(start.stderr, /migrating to/, 'saying it is migrating');
    process.kill(pidB, 'SIGKILL');
    await B.restartAfterCrash(t);
    toB.allow();
    const a = await waitState(A, 'k-dst', (s) => s !== 'migrating');
    t.equal(a, undefined, 'A settled with the restarted B: the instance moved, A dropped its copy');
    const node = await onlyOn(t, 'k-dst', B, A);
    // B's restart restarted its runs (a TPM reset, as after a host crash): NV is what lasts.
    t.equal((await tpm2Tools(t, `device:${node}`).nvRead(0x01500021, 24)).toString(), 'kept across both crashes', 'running on B with its NV');
  });

  await t.test('the same instance migrated twice at once: one migration, one refusal', async (t) => {
    await guest20(t, w, 'twice');
    const [r1, r2] = await Promise.all([migrate(A, 'twice', toB.address), migrate(A, 'twice', toB.address)]);
    t.equal([r1, r2].filter((r) => r.code === 0).length, 1, 'exactly one succeeds');
    const failed = r1.code === 0 ? r2 : r1;
    t.match(failed.stderr, /already migrating|no instance twice/, `the other is refused: ${failed.stderr.trim().slice(0, 120)}`);
    await onlyOn(t, 'twice', B, A);
  });
});

/** Send `stream` (a recorded source's bytes) to the destination directly; its replies. */
function replay(to: { host: string; port: number }, stream: Buffer): Promise<Msg[]> {
  return new Promise((resolve) => {
    const out: Msg[] = [];
    const reader = new FrameReader();
    const sock = net.connect(to, () => sock.write(stream));
    sock.on('data', (c: Buffer) => {
      for (const r of reader.push(c)) if ('msg' in r) out.push(r.msg);
    });
    sock.on('error', () => undefined);
    sock.on('close', () => resolve(out));
    setTimeout(() => sock.destroy(), 30_000).unref();
  });
}
