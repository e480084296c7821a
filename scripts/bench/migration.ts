// Suspend, resume and migrate of one TPM 2.0 instance (through the manager's control API,
// without the CLI's own start-up), beside swtpm's state blob save and load through its
// control channel (swtpm_ioctl --save / --load of the permanent and volatile blobs, one
// swtpm_ioctl process per blob as a toolstack runs them), same run, median of N.
// Migration runs between two managers on loopback, back and forth.
// Targets: migrate ≤ 100 ms; suspend and resume each ≤ 2× swtpm's save / load.
//   tsx scripts/bench/migration.ts
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { RpcClient, rpcOnce } from '../../drivers/base/rpc.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { CONTROL_VERSION } from '../../manager/control.ts';
import { launchSwtpm } from '../support/swtpm.ts';
import { isMain, printTable, stats, TcpTpmClient } from './lib.ts';

const VTPM = resolve(import.meta.dirname, '../vtpm.sh');
const run = promisify(execFile);
const vtpm = async (args: string[]) => (await run('/usr/bin/env', ['-u', 'NODE_OPTIONS', VTPM, ...args], { encoding: 'utf8', timeout: 120_000 })).stdout.trim();
const N = Number(process.env.MIGRATION_BENCH_N ?? 20);
const ms = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;
const PORTS = [17861, 17862];

async function api(runDir: string, op: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  return rpcOnce(join(runDir, 'manager.sock'), 'the manager', op, { control: CONTROL_VERSION, ...args }, 120_000);
}

async function migrateApi(runDir: string, name: string, to: string): Promise<Record<string, unknown>> {
  const c = await RpcClient.connect(join(runDir, 'manager.sock'), 'the manager');
  try {
    return await c.request('migrate', { control: CONTROL_VERSION, name, to }, 120_000);
  } finally {
    await c.end();
  }
}

const ioctl = (args: string[]) => run('swtpm_ioctl', args, { timeout: 30_000 });

export async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-mig-'));
  const hosts = [0, 1].map((i) => ({ run: join(dir, `h${i}`, 'run'), state: join(dir, `h${i}`, 'state'), hw: join(dir, `h${i}`, 'hw'), at: `127.0.0.1:${PORTS[i]}` }));
  try {
    for (const h of hosts) await vtpm(['host', 'start', '--run-dir', h.run, '--state-dir', h.state, '--hw', `tis:${h.hw}`, '--migration-listen', h.at]);
    const ids = [];
    for (const h of hosts) ids.push((await api(h.run, 'identity')).document as Uint8Array);
    await api(hosts[0]!.run, 'trust-add', { name: 'h1', document: ids[1] });
    await api(hosts[1]!.run, 'trust-add', { name: 'h0', document: ids[0] });
    await api(hosts[0]!.run, 'create', { name: 'bench', tpm: '2.0' });
    await api(hosts[0]!.run, 'start', { name: 'bench' });

    const suspend: number[] = [];
    const resume: number[] = [];
    for (let i = -2; i < N; i++) {
      let t0 = process.hrtime.bigint();
      await api(hosts[0]!.run, 'suspend', { name: 'bench' });
      const s = ms(t0);
      t0 = process.hrtime.bigint();
      await api(hosts[0]!.run, 'resume', { name: 'bench' }); // returns once the node answered
      if (i >= 0) suspend.push(s * 1000), resume.push(ms(t0) * 1000);
    }
    const migrate: number[] = [];
    let at = 0;
    for (let i = -2; i < N; i++) {
      const t0 = process.hrtime.bigint();
      await migrateApi(hosts[at]!.run, 'bench', hosts[1 - at]!.at); // returns once it runs there
      if (i >= 0) migrate.push(ms(t0) * 1000);
      at = 1 - at;
    }

    const sw = await launchSwtpm('2.0', mkdtempSync(join(dir, 'swtpm-')));
    const save: number[] = [];
    const load: number[] = [];
    try {
      const c = await TcpTpmClient.connect(sw.port);
      tpm2.parseGetRandom(await c.transmit(tpm2.getRandom(8)));
      c.close();
      const ctrl = ['--tcp', `127.0.0.1:${sw.ctrlPort}`];
      for (let i = -2; i < N; i++) {
        let t0 = process.hrtime.bigint();
        await ioctl([...ctrl, '--save', 'permanent', join(dir, 'perm.blob')]);
        await ioctl([...ctrl, '--save', 'volatile', join(dir, 'vol.blob')]);
        const s = ms(t0);
        t0 = process.hrtime.bigint();
        await ioctl([...ctrl, '--stop']);
        await ioctl([...ctrl, '--load', 'permanent', join(dir, 'perm.blob')]);
        await ioctl([...ctrl, '--load', 'volatile', join(dir, 'vol.blob')]);
        await ioctl([...ctrl, '-i']);
        if (i >= 0) save.push(s * 1000), load.push(ms(t0) * 1000);
      }
    } finally {
      await sw.stop();
    }
    const swSave = stats(save);
    printTable(`migration: suspend, resume, migrate of one instance (n=${N}, median)`, [
      { what: 'suspend (control API, vtpmd stops, volatile state sealed)', ours: stats(suspend), base: swSave, baseName: 'swtpm_ioctl --save permanent + volatile', target: 2 },
      { what: 'resume (control API, to the node answering)', ours: stats(resume), base: stats(load), baseName: 'swtpm_ioctl --stop, --load ×2, -i', target: 2 },
      { what: 'migrate between two managers on loopback (to running there)', ours: stats(migrate), base: swSave, baseName: 'swtpm save (for scale; target: 100 ms)' },
    ]);
    const med = stats(migrate).median / 1000;
    console.log(`migrate median ${med.toFixed(1)} ms: target ≤ 100 ms ${med <= 100 ? 'met' : 'MISSED'}`);
  } finally {
    for (const h of hosts) await vtpm(['host', 'stop', '--run-dir', h.run]).catch(() => '');
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMain(import.meta.url)) await main();
