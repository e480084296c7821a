// vtpm suspend / resume through the CLI: what only volatile state holds (a PCR value, a
// loaded but never persisted key) and what NV holds (a counter) are there after resume,
// checked with tpm2-tools; a plain stop/start of the same instance loses the volatile
// part (so the check can fail).
import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runTool, scratchDir, type Tap } from '../clients/run.ts';
import { sha256, tpm2Tools, type Tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, vtpm } from './host.ts';

const COUNTER = 0x01500016;
const PCR = 16;

/** A key loaded in the TPM and never persisted: its transient handle and public key. */
async function loadKey(tools: Tpm2Tools): Promise<{ handle: number; pem: string }> {
  const primary = tools.file('primary.ctx');
  await tools.run('createprimary', ['-C', 'o', '-G', 'ecc256', '-c', primary, '-Q']);
  await tools.flush();
  const pub = tools.file('key.pub');
  const priv = tools.file('key.priv');
  await tools.run('create', ['-C', primary, '-G', 'ecc256', '-u', pub, '-r', priv, '-Q']);
  await tools.flush();
  await tools.run('load', ['-C', primary, '-u', pub, '-r', priv, '-c', tools.file('key.ctx'), '-Q']);
  const loaded = await tools.handles('transient');
  await tools.run('flushcontext', [`0x${loaded[0]!.toString(16)}`]); // the parent; the key stays
  const [handle] = await tools.handles('transient');
  const pem = tools.file('key.pem');
  await tools.run('readpublic', ['-c', `0x${handle!.toString(16)}`, '-o', pem, '-f', 'pem', '-Q']);
  return { handle: handle!, pem };
}

/** Sign with the key at `handle` and verify with openssl against `pem`. */
async function signs(t: Tap, tools: Tpm2Tools, handle: number, pem: string): Promise<boolean> {
  const dir = scratchDir(t, 'sig');
  const msg = join(dir, 'msg');
  writeFileSync(msg, 'resumed where it stopped');
  const sig = join(dir, 'sig.der');
  const s = await tools.try('sign', ['-c', `0x${handle.toString(16)}`, '-g', 'sha256', '-f', 'plain', '-o', sig, msg]);
  if (s.code !== 0) {
    t.comment(`tpm2_sign: ${s.stderr.trim()}`);
    return false;
  }
  const v = await runTool('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', sig, msg]);
  if (v.code !== 0) t.comment(`openssl: ${v.stdout}${v.stderr}`);
  return v.code === 0;
}


t.test('suspend/resume keeps PCRs, an NV counter and a loaded key; stop/start keeps only NV', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'sr', '2.0');
  const tools = tpm2Tools(t, `device:${node}`);
  await tools.pcrExtend(PCR, sha256(Buffer.from('before suspend')));
  const pcr = await tools.pcrRead(PCR);
  await tools.run('nvdefine', ['0x' + COUNTER.toString(16), '-C', 'o', '-s', '8', '-a', 'nt=counter|ownerread|ownerwrite|authread|authwrite']);
  for (let i = 0; i < 3; i++) await tools.run('nvincrement', ['0x' + COUNTER.toString(16), '-C', 'o']);
  const counter = await tools.nvRead(COUNTER, 8);
  const key = await loadKey(tools);
  t.ok(await signs(t, tools, key.handle, key.pem), 'the loaded key signs before suspend');

  const s = await vtpm(['suspend', 'sr', ...host.args], 120_000);
  t.equal(s.code, 0, `vtpm suspend${s.code ? `: ${s.stderr}` : ''}`);
  t.equal((await host.row('sr')).state, 'suspended', 'vtpm list shows it suspended');
  const start = await vtpm(['start', 'sr', ...host.args]);
  t.not(start.code, 0, 'vtpm start of a suspended instance is refused');
  t.match(start.stderr, /suspended: vtpm resume sr/, 'and says to resume it');

  const r = await vtpm(['resume', 'sr', ...host.args], 120_000);
  t.equal(r.code, 0, `vtpm resume${r.code ? `: ${r.stderr}` : ''}`);
  t.equal(r.stdout.trim(), node, 'resume prints the node');
  t.equal((await host.row('sr')).state, 'running', 'running again');
  t.equal((await tools.pcrRead(PCR)).toString('hex'), pcr.toString('hex'), `PCR ${PCR} as before suspend`);
  t.equal((await tools.nvRead(COUNTER, 8)).toString('hex'), counter.toString('hex'), 'NV counter as before');
  t.same(await tools.handles('transient'), [key.handle], 'the loaded key is still loaded at its handle');
  t.ok(await signs(t, tools, key.handle, key.pem), 'and signs; the signature verifies with the public key read before');
  const again = await vtpm(['resume', 'sr', ...host.args]);
  t.not(again.code, 0, 'a second resume is refused (it is running)');

  // The control: an orderly stop/start is a TPM restart: NV stays, the rest goes.
  await host.stop(t, 'sr');
  const st = await vtpm(['start', 'sr', ...host.args], 120_000);
  t.equal(st.code, 0, `vtpm start${st.code ? `: ${st.stderr}` : ''}`);
  t.equal((await tools.nvRead(COUNTER, 8)).toString('hex'), counter.toString('hex'), 'NV counter kept by stop/start');
  t.same(await tools.handles('transient'), [], 'stop/start: no loaded key');
  t.not((await tools.pcrRead(PCR)).toString('hex'), pcr.toString('hex'), `stop/start: PCR ${PCR} reset`);
});

t.test('suspend survives a host restart; a suspended instance is not resumed by itself', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'sh', '2.0');
  const tools = tpm2Tools(t, `device:${node}`);
  await tools.pcrExtend(PCR, sha256(Buffer.from('across a host restart')));
  const pcr = await tools.pcrRead(PCR);
  t.equal((await vtpm(['suspend', 'sh', ...host.args], 120_000)).code, 0, 'suspended');
  await host.hostRestart(t);
  t.equal((await host.row('sh')).state, 'suspended', 'still suspended after the host restart');
  const r = await vtpm(['resume', 'sh', ...host.args], 120_000);
  t.equal(r.code, 0, `vtpm resume${r.code ? `: ${r.stderr}` : ''}`);
  t.equal((await tools.pcrRead(PCR)).toString('hex'), pcr.toString('hex'), 'PCR value from before the host restart');
  const s = await vtpm(['suspend', 'nosuch', ...host.args]);
  t.not(s.code, 0, 'suspend of an unknown instance fails');
  t.match(s.stderr, /no instance nosuch/, 'naming it');
});
