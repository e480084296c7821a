// tpm2-tools through our tpmrm0 as through a Linux one: the TPM 2.0 battery with
// `-T device:NODE/tpmrm0` while a second client (tpm2-tools too, another handle space) runs
// its own create/sign/verify loop beside it; what a client that exits without flushing leaves;
// and the node seen as /dev/tpmrm0 in a private mount namespace (what `vtpm exec` does).
// For each front end kind (test/tpmfront/node-kinds.ts): the raw FUSE node with the libtpms
// engine in its worker, and a node served by frontd with its own vtpmd. (libtpms keeps
// global state: one engine per process, so one raw node here; frontd's is in its vtpmd.)

import t from 'tap';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Test } from 'tap';
import { mountKind } from '../tpmfront/node-kinds.ts';
import { withNodeAsDevTpm0 } from '../../scripts/support/private-dev.ts';
import { describe, runTool, scratchDir, sleep, type ToolResult } from './run.ts';
import { runTpm2Battery } from './tpm2-battery.ts';
import { parseHandles } from './tpm2-tools.ts';

/** A second tpm2-tools client on tpmrm0: create a signing primary, sign, verify, until stopped. */
function signingLoop(rm: string, workDir: string): { stop: () => Promise<{ rounds: number; failures: ToolResult[] }> } {
  let stopping = false;
  const failures: ToolResult[] = [];
  let rounds = 0;
  const tool = async (name: string, args: string[]) => {
    const r = await runTool(`tpm2_${name}`, ['-T', `device:${rm}`, ...args], { cwd: workDir, timeoutMs: 30_000 });
    if (r.code !== 0) failures.push(r);
    return r.code === 0;
  };
  const done = (async () => {
    const msg = join(workDir, 'msg');
    await runTool('sh', ['-c', `head -c 100 /dev/urandom > ${msg}`]);
    while (!stopping && failures.length === 0) {
      const ctx = join(workDir, 'key.ctx');
      const sig = join(workDir, 'sig');
      const ok =
        (await tool('createprimary', ['-C', 'o', '-G', 'ecc', '-a', 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign', '-c', ctx, '-Q'])) &&
        (await tool('sign', ['-c', ctx, '-g', 'sha256', '-o', sig, msg])) &&
        (await tool('verifysignature', ['-c', ctx, '-g', 'sha256', '-m', msg, '-s', sig]));
      if (ok) rounds++;
    }
  })();
  return {
    stop: async () => {
      stopping = true;
      await done;
      return { rounds, failures };
    },
  };
}

for (const kind of ['raw', 'frontd'] as const) t.test(`${kind} node`, (t) => suite(t, kind));

async function suite(t: Test, kind: 'raw' | 'frontd'): Promise<void> {
  const dir = scratchDir(t, `tpmrm-node-${kind}`);
  const { node, cleanup } = await mountKind(kind, dir);
  t.teardown(cleanup);
  const rm = node.rmPath!;

  t.test('tpm2-tools battery through tpmrm0 while a second client signs in a loop', async (t) => {
    t.ok(existsSync(rm), `${rm} exists`);
    const loop = signingLoop(rm, scratchDir(t, 'tpmrm-second'));
    await runTpm2Battery(t, `device:${rm}`, { resourceManager: true });
    const { rounds, failures } = await loop.stop();
    t.ok(rounds > 0, `the second client completed ${rounds} create/sign/verify rounds meanwhile`);
    t.equal(failures.length, 0, 'none of its tools failed', { diagnostic: true, transcript: failures.map(describe).join('\n') });
  });

  t.test('tools that exit without flushing leave nothing behind', async (t) => {
    const work = scratchDir(t, 'tpmrm-leave');
    for (const args of [
      ['createprimary', '-C', 'o', '-G', 'ecc', '-c', join(work, 'p.ctx'), '-Q'],
      ['create', '-C', join(work, 'p.ctx'), '-G', 'ecc', '-u', join(work, 'k.pub'), '-r', join(work, 'k.priv'), '-Q'],
      ['load', '-C', join(work, 'p.ctx'), '-u', join(work, 'k.pub'), '-r', join(work, 'k.priv'), '-c', join(work, 'k.ctx'), '-Q'],
    ]) {
      const r = await runTool(`tpm2_${args[0]}`, ['-T', `device:${rm}`, ...args.slice(1)], { cwd: work });
      t.equal(r.code, 0, `tpm2_${args[0]} ran`, { diagnostic: r.code !== 0, transcript: describe(r) });
    }
    await sleep(100); // RELEASE of the last tool's file reaches the node after it exited
    const viaRm = await runTool('tpm2_getcap', ['-T', `device:${rm}`, 'handles-transient']);
    t.same(parseHandles(viaRm.stdout), [], 'tpm2_getcap handles-transient from a fresh tpmrm0 opener: none');
    const viaTpm0 = await runTool('tpm2_getcap', ['-T', `device:${node.path}`, 'handles-transient']);
    t.same(parseHandles(viaTpm0.stdout), [], 'and the TPM itself (through tpm0) holds no object');
  });

  t.test('in a private mount namespace the node is /dev/tpm0 and its tpmrm0 /dev/tpmrm0', async (t) => {
    const hostHad = existsSync('/dev/tpmrm0');
    const [file, args] = withNodeAsDevTpm0(node.path, ['sh', '-c', 'ls /dev; tpm2_getrandom -T device:/dev/tpmrm0 --hex 8; echo; tpm2_getrandom -T device:/dev/tpm0 --hex 8; echo']);
    const r = await runTool(file, args);
    t.equal(r.code, 0, 'ran', { diagnostic: r.code !== 0, transcript: describe(r) });
    t.match(r.stdout, /^tpmrm0$/m, '/dev/tpmrm0 is there');
    t.match(r.stdout, /^[0-9a-f]{16}\n[0-9a-f]{16}$/m, 'both answer');
    t.equal(existsSync('/dev/tpmrm0'), hostHad, 'the host\'s /dev is untouched');
  });
}
