// A full state volume under a running instance (a small tmpfs as the state dir): a save
// that fits the blob's preallocated slots is made in place and acknowledged; one that needs
// new blocks (the blob outgrows its slot) fails the guest's command with a TPM error, the
// logs name ENOSPC (and hold no command or NV bytes), and once space is freed the instance
// works from its last acknowledged state.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { stopHostAfterTest, vtpm } from '../guest/host.ts';

t.test('ENOSPC: in-place saves go on, a growing one fails, the logs say why, nothing acknowledged is lost', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-full-'));
  const state = join(base, 'state');
  const run = join(base, 'run');
  mkdirSync(state);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m,mode=0700', 'vtpm-full', state]);
  const args = ['--run-dir', run];
  t.teardown(async () => {
    try {
      await stopHostAfterTest(run);
    } finally {
      execFileSync('umount', ['-l', state]);
      rmSync(base, { recursive: true, force: true });
    }
  });
  const ok = async (a: string[]) => {
    const r = await vtpm([...a, ...args], 120_000);
    t.equal(r.code, 0, `vtpm ${a.join(' ')}${r.code ? `: ${r.stderr.trim()}` : ''}`);
    return r.stdout.trim();
  };
  await ok(['host', 'start', '--state-dir', state, '--hw', `tis:${join(base, 'hwtpm')}`]);
  const uuid = (JSON.parse(await ok(['create', 'web', '--json'])) as { uuid: string }).uuid;
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
  const inPlace = await tools.try('nvwrite', ['0x1500020', '-C', 'o', '-i', tools.writeFile('nv2.in', second)]);
  t.equal(inPlace.code, 0, `an NV write that keeps permall's size is saved in place on the full volume${inPlace.code ? `: ${inPlace.stderr}` : ''}`);

  // Each 2 KiB index grows permall by its size: within a few it outgrows its slot.
  const permall = join(state, 'instances', uuid, 'permall');
  const slotSize = statSync(permall).size;
  let failed: Awaited<ReturnType<typeof tools.try>> | undefined;
  let defined = 0;
  for (let i = 0; i < 8 && !failed; i++) {
    const r = await tools.try('nvdefine', [`0x${(0x1500030 + i).toString(16)}`, '-C', 'o', '-s', '2048', '-a', 'ownerread|ownerwrite|authread|authwrite']);
    if (r.code !== 0) failed = r;
    else defined++;
  }
  t.ok(failed, `an NV define that grows permall past its ${slotSize}-byte slot fails at the client (after ${defined} that fit)`);
  t.match(failed?.stderr, /0x101|TPM_RC_FAILURE|failure/i, 'with a TPM failure response');

  rmSync(fill);
  t.same(await tools.nvRead(0x1500020, second.length), second, 'with space back, the last acknowledged NV contents (the in-place save) are there');
  const third = Buffer.from('written-after-space-was-freed-again!');
  await tools.nvWrite(0x1500020, third.subarray(0, first.length));
  await tools.run('nvdefine', [`0x${(0x1500030 + defined).toString(16)}`, '-C', 'o', '-s', '2048', '-a', 'ownerread|ownerwrite|authread|authwrite']);
  await ok(['stop', 'web']);
  const again = tpm2Tools(t, `device:${await ok(['start', 'web'])}`);
  t.same(await again.nvRead(0x1500020, first.length), third.subarray(0, first.length), 'and new writes are stored (read after an instance restart)');
  t.ok((await again.handles('nv-index')).includes(0x1500030 + defined), 'as is the index that grew permall once there was room');

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
