// Instances started through the manager (vtpm start/stop/exec), their state kept by the
// manager over vtpmd's state link: real vtpmd, real tpm0 nodes, real tpm2-tools, the
// encrypted store on disk. Nothing in the state dir, the run dir or any log holds the
// secrets written through the node.
import { execFile } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { sha256, tpm2Tools } from '../clients/tpm2-tools.ts';
import { stopHostAfterTest, vtpm } from '../guest/host.ts';
import { newestSlotFile, restore, snapshot } from './store-fixtures.ts';

interface Host {
  run: string;
  state: string;
  hw: string;
  args: string[];
}

function newHost(tt: Test): Host {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-inst-'));
  const h = { run: join(base, 'run'), state: join(base, 'state'), hw: join(base, 'hwtpm'), args: [] as string[] };
  h.args = ['--run-dir', h.run];
  tt.teardown(async () => {
    try {
      await stopHostAfterTest(h.run);
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
  });
  return h;
}

const hostStart = (h: Host) => vtpm(['host', 'start', '--state-dir', h.state, '--hw', `tis:${h.hw}`, ...h.args], 120_000);
const ok = async (tt: Test, args: string[], timeoutMs = 120_000) => {
  const r = await vtpm(args, timeoutMs);
  tt.equal(r.code, 0, `vtpm ${args.join(' ')}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  return r.stdout.trim();
};

/** Every file under `dir` (regular files only), for the plaintext search. */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      if (e.name === 'dev') continue; // a node's mount point
      out.push(...filesUnder(p));
    } else if (e.isFile()) out.push(p);
  }
  return out;
}

t.test('start through the manager: tpm2-tools on the node, state kept across stop/start and a host restart, never in plain', async (t) => {
  const h = newHost(t);
  t.equal((await hostStart(h)).code, 0, 'host start');
  await ok(t, ['create', 'web', '--tpm', '2.0', ...h.args]);
  await ok(t, ['create', 'legacy', '--tpm', '1.2', ...h.args]);
  const node = await ok(t, ['start', 'web', ...h.args]);
  t.equal(node, join(h.run, 'web', 'dev', 'tpm0'), 'start prints the node path');
  const again = await vtpm(['start', 'web', ...h.args]);
  t.not(again.code, 0, 'a running instance is not started twice');
  t.match(again.stderr, /already running/);

  const secret = Buffer.from('vtpm-manager-secret-' + process.pid.toString(16).padStart(8, '0'));
  const tools = tpm2Tools(t, `device:${node}`);
  await tools.nvWrite(0x1500016, secret);
  t.same(await tools.nvRead(0x1500016, secret.length), secret, 'NV written and read through the node');
  const digest = sha256(Buffer.from('measured'));
  await tools.pcrExtend(16, digest);
  const pcr16 = await tools.pcrRead(16);

  const list = JSON.parse(await ok(t, ['list', '--json', ...h.args]));
  t.match(list.find((i: { name: string }) => i.name === 'web'), { state: 'running', node });
  t.match(list.find((i: { name: string }) => i.name === 'legacy'), { state: 'stopped' });
  const busy = await vtpm(['destroy', 'web', ...h.args]);
  t.not(busy.code, 0, 'a running instance cannot be destroyed');

  const exec = await new Promise<{ code: number; out: string }>((resolve) =>
    execFile('/usr/bin/env', ['-u', 'NODE_OPTIONS', join(import.meta.dirname, '../../scripts/vtpm.sh'), 'exec', 'web', ...h.args, '--', 'tpm2_getrandom', '-T', 'device:/dev/tpm0', '--hex', '8'], { encoding: 'utf8', timeout: 60_000 }, (err, out) =>
      resolve({ code: err ? 1 : 0, out }),
    ),
  );
  t.equal(exec.code, 0, 'vtpm exec: tpm2_getrandom on /dev/tpm0');
  t.match(exec.out.trim(), /^[0-9a-f]{16}$/);

  await ok(t, ['stop', 'web', ...h.args]);
  await ok(t, ['start', 'web', ...h.args]);
  t.same(await tools.nvRead(0x1500016, secret.length), secret, 'NV index survives stop/start');
  t.not((await tools.pcrRead(16)).toString('hex'), pcr16.toString('hex'), 'PCRs start at zero again, as after a reboot');

  const l12 = await ok(t, ['start', 'legacy', ...h.args]);
  t.equal(l12, join(h.run, 'legacy', 'dev', 'tpm0'), 'a TPM 1.2 instance starts (its node answered a GetRandom)');

  const stopped = await vtpm(['host', 'stop', ...h.args], 120_000);
  t.equal(stopped.code, 0, `host stop stops every instance${stopped.code ? `: ${stopped.stderr}` : ''}`);
  t.equal((await hostStart(h)).code, 0, 'host start again');
  t.match(JSON.parse(await ok(t, ['list', '--json', ...h.args])), [{ state: 'stopped' }, { state: 'stopped' }], 'instances are stopped after a host restart');
  const node2 = await ok(t, ['start', 'web', ...h.args]);
  t.same(await tools.nvRead(0x1500016, secret.length), secret, 'NV index survives a host restart');
  t.equal(node2, node);

  // The state is the manager's, encrypted: no plaintext secret anywhere on disk.
  const files = [...filesUnder(h.state), ...filesUnder(h.run)];
  t.ok(files.some((f) => f.includes('/instances/')), 'instance blobs are in the state dir');
  t.notOk(readdirSync(join(h.run, 'web')).includes('state'), 'vtpmd kept no state dir of its own');
  const leaks = files.filter((f) => statSync(f).size < 64 << 20 && readFileSync(f).includes(secret));
  t.same(leaks, [], 'the NV secret is in no file of the state dir, the run dir or a log');
  for (const f of files.filter((f) => f.startsWith(h.state))) t.equal(statSync(f).mode & 0o077, 0, `${f.slice(h.state.length)} is 0600`);
});

t.test('a flipped byte or an old copy of an instance blob: that instance refuses to start and says why; another is unaffected', async (t) => {
  const h = newHost(t);
  t.equal((await hostStart(h)).code, 0, 'host start');
  const a = JSON.parse(await ok(t, ['create', 'a', '--json', ...h.args]));
  await ok(t, ['create', 'b', ...h.args]);
  const node = await ok(t, ['start', 'a', ...h.args]);
  const tools = tpm2Tools(t, `device:${node}`);
  await tools.nvWrite(0x1500060, Buffer.from('first'));
  await ok(t, ['stop', 'a', ...h.args]);
  const blobDir = join(h.state, 'instances', a.uuid);
  const old = snapshot(blobDir, 'permall'); // both slot files of the blob

  await ok(t, ['start', 'a', ...h.args]);
  await tools.nvWrite(0x1500060, Buffer.from('later'));
  await ok(t, ['stop', 'a', ...h.args]);
  const current = snapshot(blobDir, 'permall');

  const newest = newestSlotFile(blobDir, 'permall')!;
  const flipped = Buffer.from(current.get(newest)!);
  flipped[8 + (flipped.readUInt32BE(4) >> 1)]! ^= 0x04; // mid-record (after the slot header): in the ciphertext
  writeFileSync(newest, flipped);
  const tampered = await vtpm(['start', 'a', ...h.args], 120_000);
  t.not(tampered.code, 0, 'a tampered blob: the instance does not start');
  t.match(tampered.stderr, /failed authentication/, `and says its state failed authentication: ${tampered.stderr.trim().slice(0, 200)}`);

  restore(old);
  const rolled = await vtpm(['start', 'a', ...h.args], 120_000);
  t.not(rolled.code, 0, 'an old copy of the blob: the instance does not start');
  t.match(rolled.stderr, /older than the recorded version/, 'and says it is an old copy');

  await ok(t, ['start', 'b', ...h.args]);
  t.pass('another instance starts meanwhile');
  restore(current);
  const back = await ok(t, ['start', 'a', ...h.args]);
  t.same(await tpm2Tools(t, `device:${back}`).nvRead(0x1500060, 5), Buffer.from('later'), 'with its own latest blob back, the instance starts with its state');
});
