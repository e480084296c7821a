// A full state volume under a running instance (a small tmpfs as the state dir): the
// guest's command fails with a TPM error, the logs name ENOSPC (and hold no command or NV
// bytes), and once space is freed the instance works from its last acknowledged state.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { vtpm } from '../guest/host.ts';

t.test('ENOSPC: the command fails, the logs say why, nothing acknowledged is lost', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-full-'));
  const state = join(base, 'state');
  const run = join(base, 'run');
  mkdirSync(state);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,mode=0700', 'vtpm-full', state]);
  const args = ['--run-dir', run];
  t.teardown(async () => {
    await vtpm(['host', 'stop', ...args], 120_000);
    execFileSync('umount', ['-l', state]);
    rmSync(base, { recursive: true, force: true });
  });
  const ok = async (a: string[]) => {
    const r = await vtpm([...a, ...args], 120_000);
    t.equal(r.code, 0, `vtpm ${a.join(' ')}${r.code ? `: ${r.stderr.trim()}` : ''}`);
    return r.stdout.trim();
  };
  await ok(['host', 'start', '--state-dir', state, '--hw', `tis:${join(base, 'hwtpm')}`]);
  await ok(['create', 'web']);
  const node = await ok(['start', 'web']);
  const tools = tpm2Tools(t, `device:${node}`);
  const first = Buffer.from('acknowledged-before-the-disk-filled');
  const second = Buffer.from('written-while-the-disk-was-full-xx!');
  await tools.nvWrite(0x1500020, first);

  // Fill the volume to the last byte.
  const fill = join(state, 'fill');
  try {
    execFileSync('dd', ['if=/dev/zero', `of=${fill}`, 'bs=4k'], { stdio: 'ignore' });
  } catch {
    /* dd stops with ENOSPC: that is the point */
  }
  const failed = await tools.try('nvwrite', ['0x1500020', '-C', 'o', '-i', tools.writeFile('nv2.in', second)]);
  t.not(failed.code, 0, 'an NV write on a full volume fails at the client');
  t.match(failed.stderr, /0x101|TPM_RC_FAILURE|failure/i, 'with a TPM failure response');

  rmSync(fill);
  t.same(await tools.nvRead(0x1500020, first.length), first, 'with space back, the last acknowledged NV contents are there');
  const third = Buffer.from('written-after-space-was-freed-again!');
  await tools.nvWrite(0x1500020, third.subarray(0, first.length));
  t.same(await tools.nvRead(0x1500020, first.length), third.subarray(0, first.length), 'and new writes are stored');

  const logs = readdirSync(join(run, 'web')).filter((f) => f.endsWith('.log')).map((f) => join(run, 'web', f));
  logs.push(join(run, 'manager.log'));
  const text = logs.map((f) => readFileSync(f, 'utf8')).join('\n');
  t.match(text, /ENOSPC|file system is full/, 'the logs name the full file system');
  for (const f of logs) {
    const bytes = readFileSync(f);
    t.notOk(bytes.includes(second) || bytes.includes(Buffer.from(second.toString('hex'))), `${f.slice(run.length)} holds no NV data`);
    t.notMatch(bytes.toString('utf8'), /([0-9a-f]{2} ){12}/, `${f.slice(run.length)} holds no hex dump`);
  }
});
