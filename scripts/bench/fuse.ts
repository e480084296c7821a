// The FUSE hop's own cost: TPM2_GetRandom(16) write+read through tpm0 with the raw front end
// and with fuse-native (both on the in-worker libtpms engine backend), beside the same
// command sent to the engine in-process. The client loop runs in a worker thread (plain
// open/write/read syscalls through Node's sync fs) so it never shares a thread with a
// front end. Run alone: npx tsx scripts/bench/fuse.ts   (VTPM_BENCH_N to change N)
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import { mountTpmNode, type FrontEnd } from '../../drivers/tpmfront/mount.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';
import { isMain, printTable, stats, timeSync, type Stats } from './lib.ts';

const N = Number(process.env.VTPM_BENCH_N ?? 5000);
const CMD = tpm2.getRandom(16);

// Client loop in a worker: open once, then N × (write command, read response), µs each.
const CLIENT = `
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { path, cmd, n, warmup } = workerData;
const fd = fs.openSync(path, 'r+');
const out = Buffer.alloc(4096);
const samples = new Float64Array(n);
for (let i = 0; i < warmup + n; i++) {
  const t0 = process.hrtime.bigint();
  fs.writeSync(fd, cmd);
  const got = fs.readSync(fd, out, 0, 4096, null);
  if (got < 10 || out.readUInt32BE(6) !== 0) throw new Error('GetRandom failed through ' + path);
  if (i >= warmup) samples[i - warmup] = Number(process.hrtime.bigint() - t0) / 1000;
}
fs.closeSync(fd);
parentPort.postMessage(samples);
`;

function clientLoop(path: string): Promise<Stats> {
  return new Promise((resolve, reject) => {
    const w = new Worker(CLIENT, { eval: true, workerData: { path, cmd: Buffer.from(CMD), n: N, warmup: 200 } });
    w.once('message', (s: Float64Array) => resolve(stats(s)));
    w.once('error', reject);
  });
}

async function throughNode(frontEnd: FrontEnd, dir: string): Promise<Stats> {
  const node = await mountTpmNode({ dir: join(dir, frontEnd), frontEnd, backend: engineBackendSpec({ version: '2.0' }) });
  try {
    return await clientLoop(node.path);
  } finally {
    await node.close();
  }
}

export async function main(): Promise<void> {
  // In-process first: libtpms is one engine per process, each node's engine comes after.
  const engine = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  engine.process(tpm2.startup());
  const out = new Uint8Array(4096);
  const inProc = timeSync(N, () => engine.processInto(CMD, out));
  engine.terminate();
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-fuse-'));
  try {
    const raw = await throughNode('raw', dir);
    const native = await throughNode('native', dir);
    printTable(`tpm0 FUSE front ends, TPM2_GetRandom(16) write+read, N=${N}`, [
      { what: 'raw FUSE worker (engine in the worker)', ours: raw, base: inProc, baseName: 'engine in-process' },
      { what: 'fuse-native (engine in a backend worker)', ours: native, base: inProc, baseName: 'engine in-process' },
      { what: 'raw vs fuse-native', ours: raw, base: native, baseName: 'fuse-native' },
    ]);
    console.log(`\nFUSE hop alone (median): raw ${(raw.median - inProc.median).toFixed(1)} µs, fuse-native ${(native.median - inProc.median).toFixed(1)} µs`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMain(import.meta.url)) {
  main().then(
    () => process.exit(0),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}
