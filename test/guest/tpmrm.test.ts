// A TPM 2.0 guest started by the manager has tpmrm0 beside tpm0: two programs at once in
// that guest, each through tpmrm0 with its own handle space (as on a Linux machine), over
// vtpmd and the state link; `vtpm exec` shows it as /dev/tpmrm0; a TPM 1.2 guest has none.
import t from 'tap';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runTool, scratchDir } from '../clients/run.ts';
import { parseHandles } from '../clients/tpm2-tools.ts';
import { TestHost, vtpm } from './host.ts';

/** One program's loop on `rm`: a signing primary, a signature, its check, `rounds` times. */
async function signLoop(rm: string, dir: string, rounds: number): Promise<string[]> {
  const failures: string[] = [];
  const msg = join(dir, 'msg');
  writeFileSync(msg, `signed in ${dir}`);
  for (let i = 0; i < rounds && failures.length === 0; i++) {
    for (const [tool, args] of [
      ['createprimary', ['-C', 'o', '-G', 'ecc', '-a', 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign', '-c', join(dir, 'key.ctx'), '-Q']],
      ['sign', ['-c', join(dir, 'key.ctx'), '-g', 'sha256', '-o', join(dir, 'sig'), msg]],
      ['verifysignature', ['-c', join(dir, 'key.ctx'), '-g', 'sha256', '-m', msg, '-s', join(dir, 'sig')]],
    ] as const) {
      const r = await runTool(`tpm2_${tool}`, ['-T', `device:${rm}`, ...args], { cwd: dir, timeoutMs: 30_000 });
      if (r.code !== 0) failures.push(`tpm2_${tool}: ${r.stderr.trim().slice(0, 300)}`);
      if (r.code !== 0) break;
    }
  }
  return failures;
}

t.test('two programs at once through a guest\'s tpmrm0', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'rm', '2.0');
  const rm = join(node, '..', 'tpmrm0');
  t.ok(existsSync(rm), 'tpmrm0 beside tpm0 in the guest\'s node dir');
  const [a, b] = await Promise.all([signLoop(rm, scratchDir(t, 'rm-a'), 4), signLoop(rm, scratchDir(t, 'rm-b'), 4)]);
  t.same(a, [], 'the first program: every key created, every signature verified');
  t.same(b, [], 'the second, at the same time: no handle clash');
  const left = await runTool('tpm2_getcap', ['-T', `device:${rm}`, 'handles-transient']);
  t.same(parseHandles(left.stdout), [], 'a fresh opener sees no transient object left behind');
  const raw = await runTool('tpm2_getcap', ['-T', `device:${node}`, 'handles-transient']);
  t.same(parseHandles(raw.stdout), [], 'nor does tpm0 (every space was flushed when its file closed)');
  const ex = await vtpm(['exec', 'rm', ...host.args, '--', 'sh', '-c', 'ls /dev/tpmrm0 && tpm2_getrandom -T device:/dev/tpmrm0 --hex 8']);
  t.equal(ex.code, 0, `vtpm exec sees /dev/tpmrm0${ex.code ? `: ${ex.stderr}` : ''}`);
  t.match(ex.stdout, /[0-9a-f]{16}\s*$/, 'and it answers');
});

t.test('a TPM 1.2 guest has no tpmrm0', async (t) => {
  const host = new TestHost(t);
  const node = await host.start(t, 'rm12', '1.2');
  t.notOk(existsSync(join(node, '..', 'tpmrm0')), 'only tpm0');
});
