// The manager's costs, beside their comparisons from the same run:
// - a state save in the manager's store (encrypt, then the blob's older slot file
//   rewritten in place + fdatasync) vs a plain open(w) + write + fsync + close of the same
//   bytes in the same directory, interleaved (target ≤ 1.5×);
// - NV_Write through a guest's tpm0 with the manager (vtpmd, state over the link,
//   encrypted) vs a tpm0 whose FUSE worker runs libtpms itself on plain state files (no
//   vtpmd hop, no manager): the difference is the whole cost of keeping state safe;
// - `vtpm start` to the node's first answer vs a `swtpm socket` start to its first answer
//   (target ≤ 3×), also the control API's start alone (without the CLI's own start-up).
//   tsx scripts/bench/manager.ts
import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { closeSync, fsyncSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { rpcOnce } from '../../drivers/base/rpc.ts';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import { mountTpmNode } from '../../drivers/tpmfront/mount.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPMA_NV } from '../../drivers/tpm/tpm2-structures.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';
import { CONTROL_VERSION } from '../../manager/control.ts';
import { InstanceStore } from '../../manager/store/blob-store.ts';
import { newKey } from '../../manager/store/crypto.ts';
import { launchSwtpm } from '../support/swtpm.ts';
import { isMain, printTable, stats, type Row, TcpTpmClient } from './lib.ts';

const VTPM = resolve(import.meta.dirname, '../vtpm.sh');
const run = promisify(execFile);
const vtpm = async (args: string[]) => (await run('/usr/bin/env', ['-u', 'NODE_OPTIONS', VTPM, ...args], { encoding: 'utf8', timeout: 120_000 })).stdout.trim();
const SAVES = Number(process.env.MANAGER_BENCH_SAVES ?? 300);
const NV_WRITES = Number(process.env.MANAGER_BENCH_NV ?? 200);
const STARTS = Number(process.env.MANAGER_BENCH_STARTS ?? 5);
const us = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1000;

/** Store-layer save vs plain write + fsync, interleaved so both see the same disk; the
 *  plain file sits in the store's own instance directory (same directory, same file system). */
function saves(dir: string, size: number): Row {
  const store = new InstanceStore({ stateDir: join(dir, 'store'), uuid: randomUUID(), key: newKey() });
  const blob = randomBytes(size);
  const plain = join(store.dir, 'plain.bin');
  const a: number[] = [];
  const b: number[] = [];
  for (let i = -20; i < SAVES; i++) {
    let t0 = process.hrtime.bigint();
    store.store('permall', blob);
    const ours = us(t0);
    t0 = process.hrtime.bigint();
    const fd = openSync(plain, 'w', 0o600);
    writeSync(fd, blob);
    fsyncSync(fd);
    closeSync(fd);
    const base = us(t0);
    if (i >= 0) a.push(ours), b.push(base);
  }
  return { what: `state save, ${size} B (encrypt, in-place slot write + fdatasync)`, ours: stats(a), base: stats(b), baseName: 'write + fsync', target: 1.5 };
}

async function nvWrites(node: string): Promise<number[]> {
  const dev = await TpmDevice.open(node);
  const c = new Tpm2Client(dev);
  const index = 0x1500040;
  try {
    await c.nvDefineSpace({ index, nameAlg: tpm2.TPM_ALG_SHA256, attributes: TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE, authPolicy: new Uint8Array(0), dataSize: 64 });
    const out: number[] = [];
    for (let i = -10; i < NV_WRITES; i++) {
      const t0 = process.hrtime.bigint();
      await c.nvWrite(index, randomBytes(64));
      if (i >= 0) out.push(us(t0));
    }
    return out;
  } finally {
    await dev.close();
  }
}

export async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-mgr-'));
  const runDir = join(dir, 'run');
  const args = ['--run-dir', runDir];
  const sock = join(runDir, 'manager.sock');
  try {
    const rows = [saves(dir, 1300), saves(dir, 9000)];

    await vtpm(['host', 'start', '--state-dir', join(dir, 'state'), '--hw', `tis:${join(dir, 'hwtpm')}`, ...args]);
    await vtpm(['create', 'bench', ...args]);
    const cliStarts: number[] = [];
    const apiStarts: number[] = [];
    const swStarts: number[] = [];
    for (let i = 0; i < STARTS; i++) {
      let t0 = process.hrtime.bigint();
      await vtpm(['start', 'bench', ...args]); // returns once the node answered a GetRandom
      cliStarts.push(us(t0));
      await vtpm(['stop', 'bench', ...args]);
      t0 = process.hrtime.bigint();
      await rpcOnce(sock, 'the manager', 'start', { control: CONTROL_VERSION, name: 'bench' }, 120_000);
      apiStarts.push(us(t0));
      await vtpm(['stop', 'bench', ...args]);
      const swDir = mkdtempSync(join(dir, 'swtpm-'));
      t0 = process.hrtime.bigint();
      const sw = await launchSwtpm('2.0', swDir);
      const c = await TcpTpmClient.connect(sw.port);
      tpm2.parseGetRandom(await c.transmit(tpm2.getRandom(8)));
      swStarts.push(us(t0));
      c.close();
      await sw.stop();
    }
    const swStats = stats(swStarts);
    rows.push(
      { what: '`vtpm start` (CLI) to the first answer', ours: stats(cliStarts), base: swStats, baseName: 'swtpm start to first answer', target: 3 },
      { what: 'control API start to the first answer', ours: stats(apiStarts), base: swStats, baseName: 'swtpm start to first answer', target: 3 },
    );

    const node = await vtpm(['start', 'bench', ...args]);
    const plain = await mountTpmNode({ dir: join(dir, 'plain'), frontEnd: 'raw', backend: engineBackendSpec({ version: '2.0', stateDir: join(dir, 'plain-state') }), handleSignals: false });
    try {
      const withManager = await nvWrites(node);
      const plainFiles = await nvWrites(plain.path);
      rows.push({ what: 'NV_Write(64 B) via tpm0, state with the manager', ours: stats(withManager), base: stats(plainFiles), baseName: 'tpm0 with libtpms in its worker, plain files' });
    } finally {
      await plain.close();
    }
    printTable(`manager: state saves (n=${SAVES}), starts (n=${STARTS}), NV writes (n=${NV_WRITES})`, rows);
  } finally {
    await vtpm(['host', 'stop', ...args]).catch(() => '');
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMain(import.meta.url)) await main();
