// `vtpm host start|stop|status` and `vtpm create|destroy|list`: the host's manager and its
// instances, over the manager's control API (RUN/manager.sock).
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { Msg } from '../../drivers/base/frame.ts';
import { builtScript, ensureBuilt, nodeArgs, nodeEnv } from '../../drivers/base/modules.ts';
import { rpcOnce } from '../../drivers/base/rpc.ts';
import { startDaemon, stopProcess, waitExit } from '../../drivers/host/daemon.ts';
import { authorityPid } from '../../drivers/xen/authority-launch.ts';
import { CONTROL_VERSION, DEFAULT_WARM, INSTANCE_NAME, MAX_WARM } from '../../manager/control.ts';
import { parsePcrList } from '../../manager/hardware/pcrs.ts';
import { parseAddress } from '../../manager/migration/channel.ts';
import { stopLeftFrontd, stopLeftGroups } from '../../manager/leftovers.ts';
import { qemuTpmArgs, type TpmDevice } from '../../drivers/swtpm_ctrl/qemu-args.ts';
import { printTable } from './table.ts';

export const DEFAULTS = {
  runDir: () => process.env.VTPM_RUN_DIR ?? '/run/vtpm',
  stateDir: () => process.env.VTPM_STATE_DIR ?? '/var/lib/vtpm',
  hw: () => process.env.VTPM_HW ?? 'tis:/var/lib/vtpm-hwtpm',
};

const sockPath = (runDir: string) => join(resolve(runDir), 'manager.sock');

/** One control request to the manager of `runDir`; a missing manager is said plainly. */
export async function control(runDir: string, op: string, args: Msg = {}, timeoutMs = 60_000): Promise<Msg> {
  const path = sockPath(runDir);
  if (!existsSync(path)) throw new VtpmError('ENOENT', `no manager runs for ${resolve(runDir)} (start one with: vtpm host start)`);
  return rpcOnce(path, `the manager at ${path}`, op, { control: CONTROL_VERSION, ...args }, timeoutMs);
}

async function managerRunning(runDir: string): Promise<Msg | null> {
  try {
    return await control(runDir, 'status', {}, 5000);
  } catch {
    return null;
  }
}

function name(v: string): string {
  if (!INSTANCE_NAME.test(v)) throw new VtpmError('EINVAL', `instance name ${JSON.stringify(v)}: use 1-32 of a-z 0-9 _ -, starting with a letter or digit`);
  return v;
}
function qemuDevice(v: string): TpmDevice {
  if (v !== 'tpm-tis' && v !== 'tpm-crb') throw new InvalidArgumentError('use tpm-tis or tpm-crb');
  return v;
}
function fuseKind(v: string): 'raw' | 'native' {
  if (v !== 'raw' && v !== 'native') throw new InvalidArgumentError('use raw or native');
  return v;
}

/** The run dir (0700), made if missing; a path that is not a directory we can use is refused. */
function prepareRunDir(dir: string): string {
  const d = resolve(dir);
  try {
    mkdirSync(d, { recursive: true, mode: 0o700 });
    if (!statSync(d).isDirectory()) throw new Error('not a directory');
    chmodSync(d, 0o700);
  } catch (e) {
    throw new VtpmError('EINVAL', `run dir ${d} is unusable: ${(e as Error).message}`, { cause: e });
  }
  return d;
}
function tpmVersion(v: string): '1.2' | '2.0' {
  if (v !== '1.2' && v !== '2.0') throw new InvalidArgumentError('use 1.2 or 2.0');
  return v;
}
function pcrList(v: string): string {
  try {
    parsePcrList(v);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
  return v;
}

interface HostStartOptions {
  runDir: string;
  stateDir: string;
  hw: string;
  pcrs?: string;
  migrationListen?: string;
  warm?: number;
  foreground?: boolean;
  json?: boolean;
}

async function hostStart(o: HostStartOptions): Promise<void> {
  const runDir = resolve(o.runDir);
  const running = await managerRunning(runDir);
  if (running) throw new VtpmError('EBUSY', `a manager already runs for ${runDir} (pid ${String(running.pid)}, epoch ${String(running.epoch)})`);
  prepareRunDir(runDir);
  await ensureBuilt();
  const script = builtScript('manager/daemon');
  const args = ['--state-dir', resolve(o.stateDir), '--run-dir', runDir, '--hw', o.hw, ...(o.pcrs !== undefined ? ['--pcrs', o.pcrs] : []), ...(o.migrationListen ? ['--migration-listen', o.migrationListen] : []), ...(o.warm !== undefined ? ['--warm', String(o.warm)] : [])];
  if (o.foreground) {
    const child = spawn(process.execPath, [...nodeArgs(script), script, ...args], { stdio: 'inherit', env: nodeEnv(script) });
    for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => child.kill(sig));
    process.exitCode = await new Promise<number>((r) => child.once('exit', (c, sig) => r(c ?? (sig ? 128 : 1))));
    return;
  }
  const d = await startDaemon(script, args, { log: join(runDir, 'manager.log'), timeoutMs: 60_000 });
  if (o.json) return console.log(JSON.stringify({ pid: d.pid, ...d.info }));
  console.log(`manager running for ${runDir} (pid ${d.pid}, epoch ${String(d.info.epoch)}, hardware: ${String(d.info.hardware)})`);
}

async function hostStop(runDir: string): Promise<void> {
  const st = await managerRunning(runDir);
  if (st) {
    await control(runDir, 'shutdown');
    const pid = Number(st.pid);
    // Every instance is shut down orderly first: the wait grows with how many there are.
    const ms = 30_000 + 500 * Number(st.instances ?? 0);
    if (!(await waitExit(pid, ms))) throw new VtpmError('ETIMEDOUT', `the manager (pid ${pid}) did not stop within ${Math.round(ms / 1000)} s (see ${join(resolve(runDir), 'manager.log')})`);
  }
  // A front-end process a killed manager left, then the authority (the hypervisor role)
  // that the manager started, which outlives it: stopped last.
  const frontd = await stopLeftFrontd(resolve(runDir));
  const groups = await stopLeftGroups(resolve(runDir));
  const authority = authorityPid(resolve(runDir), true);
  if (authority !== undefined) await stopProcess(authority);
  console.log(`host ${resolve(runDir)} stopped${st ? ' (manager and its instances)' : ''}${frontd !== undefined ? ' (front-end process)' : ''}${groups.length ? ` (${groups.length} vtpmd group process${groups.length > 1 ? 'es' : ''})` : ''}${authority !== undefined ? ' (authority)' : ''}`);
}

function groupName(v: string): string {
  if (!INSTANCE_NAME.test(v)) throw new InvalidArgumentError('1-32 of a-z 0-9 _ -, starting with a letter or digit');
  return v;
}

function warmCount(v: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n > MAX_WARM) throw new InvalidArgumentError(`a count 0-${MAX_WARM}`);
  return n;
}

function address(v: string): string {
  try {
    parseAddress(v);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
  return v;
}

export function registerHost(program: Command): Command {
  const runDirOpt = ['--run-dir <dir>', 'runtime dir: sockets, nodes, logs (VTPM_RUN_DIR)'] as const;
  const host = program.command('host').description("the host's manager: sealed state, instance table, control API");
  host
    .command('start')
    .description('start the manager: unseal the root key from the hardware TPM, open the instance table')
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--state-dir <dir>', 'encrypted state of every instance (VTPM_STATE_DIR)', DEFAULTS.stateDir())
    .option('--hw <spec>', 'hardware TPM: tis:DIR (emulated chip, NVRAM in DIR) or device:PATH (VTPM_HW)', DEFAULTS.hw())
    .option('--pcrs <list>', 'PCRs a new root key is sealed to (default 0,2,4,7; "" for none)', pcrList)
    .option('--migration-listen <addr:port>', 'take migrations from trusted hosts on this TCP address', address)
    .option('--warm <n>', `vtpmd processes kept started for the next starts (0-${MAX_WARM}, default ${DEFAULT_WARM})`, warmCount)
    .option('--foreground', 'run in this terminal instead of in the background')
    .option('--json', 'machine-readable output')
    .action(hostStart);
  host
    .command('stop')
    .description('stop the manager (a clean epoch change, every instance stopped) and the host\'s authority')
    .option(...runDirOpt, DEFAULTS.runDir())
    .action((o: { runDir: string }) => hostStop(o.runDir));
  host
    .command('status')
    .description("the manager's epoch, hardware TPM and instance count")
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (o: { runDir: string; json?: boolean }) => {
      const st = await control(o.runDir, 'status');
      delete st.v, delete st.id, delete st.ok;
      if (o.json) return console.log(JSON.stringify(st));
      console.log(`manager pid ${String(st.pid)}, epoch ${String(st.epoch)}, ${String(st.instances)} instance(s)`);
      console.log(`hardware TPM: ${String(st.hardware)}; root key sealed to PCRs ${(st.pcrs as number[]).join(',') || 'none'}`);
      console.log(`state: ${String(st.stateDir)}  run: ${String(st.runDir)}`);
      const warm = st.warm as { size: number; pids: number[] };
      console.log(`warm pool: ${warm.pids.length} of ${warm.size} vtpmd processes waiting`);
    });
  return host;
}

export function registerInstances(program: Command): void {
  const runDirOpt = ['--run-dir <dir>', 'runtime dir of the host (VTPM_RUN_DIR)'] as const;
  program
    .command('create <name>')
    .description('create an instance bound for life to guest NAME (a uuid is assigned)')
    .option('--tpm <version>', 'TPM 1.2 or 2.0', tpmVersion, '2.0' as const)
    .option('--group <group>', "run its engine in this group's vtpmd process (one process for the group's vTPMs; default: a vtpmd of its own)", groupName)
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (n: string, o: { tpm: string; group?: string; runDir: string; json?: boolean }) => {
      const r = await control(o.runDir, 'create', { name: name(n), tpm: o.tpm, ...(o.group ? { group: o.group } : {}) });
      if (o.json) return console.log(JSON.stringify({ name: r.name, uuid: r.uuid, tpm: r.tpm, ...(r.group ? { group: r.group } : {}) }));
      console.log(`created ${String(r.name)} (TPM ${String(r.tpm)}, uuid ${String(r.uuid)}${r.group ? `, group ${String(r.group)}` : ''})`);
    });
  program
    .command('destroy <name>')
    .description("destroy an instance: its key is dropped and its files removed (no undo)")
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (n: string, o: { runDir: string }) => {
      const r = await control(o.runDir, 'destroy', { name: name(n) });
      console.log(`destroyed ${String(r.name)} (uuid ${String(r.uuid)})`);
    });
  program
    .command('start <name>')
    .description("launch the instance's vtpmd and tpm0 node; prints the node's path once it answers (--qemu: QEMU's arguments)")
    .option('--fuse <kind>', 'FUSE front end: raw (default) or native (fuse-native)', fuseKind, 'raw' as const)
    .option('--qemu', "serve a QEMU/KVM guest (swtpm control protocol) instead of a tpm0 node; prints QEMU's -chardev/-tpmdev/-device arguments")
    .option('--device <model>', 'with --qemu: the TPM device QEMU models, tpm-tis (default) or tpm-crb', qemuDevice, 'tpm-tis' as const)
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (n: string, o: { runDir: string; fuse: string; qemu?: boolean; device: TpmDevice; json?: boolean }) => {
      const r = await control(o.runDir, 'start', { name: name(n), fuse: o.qemu ? 'qemu' : o.fuse }, 120_000);
      if (!o.qemu) return console.log(o.json ? JSON.stringify({ name: r.name, node: r.node }) : String(r.node));
      const qemu = qemuTpmArgs({ ctrlPath: String(r.node), device: o.device });
      console.log(o.json ? JSON.stringify({ name: r.name, ctrl: r.node, qemu }) : qemu.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`)).join(' '));
    });
  program
    .command('stop <name>')
    .description('stop the instance (an orderly TPM shutdown); its state stays with the manager')
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (n: string, o: { runDir: string }) => {
      await control(o.runDir, 'stop', { name: name(n) }, 120_000);
      console.log(`stopped ${n}`);
    });
  program
    .command('suspend <name>')
    .description("suspend the instance: its whole running TPM (PCRs, sessions, loaded keys) goes to the manager, sealed")
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (n: string, o: { runDir: string }) => {
      await control(o.runDir, 'suspend', { name: name(n) }, 120_000);
      console.log(`suspended ${n} (vtpm resume ${n} starts it where it stopped)`);
    });
  program
    .command('resume <name>')
    .description('start a suspended instance where it stopped; prints its node once it answers')
    .option('--fuse <kind>', 'FUSE front end: raw (default) or native (fuse-native)', fuseKind, 'raw' as const)
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (n: string, o: { runDir: string; fuse: string; json?: boolean }) => {
      const r = await control(o.runDir, 'resume', { name: name(n), fuse: o.fuse }, 120_000);
      console.log(o.json ? JSON.stringify({ name: r.name, node: r.node }) : String(r.node));
    });
  program
    .command('exec <name> <command...>')
    .description("run a command that sees the instance's node as /dev/tpm0 (private mount namespace)")
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (n: string, command: string[], o: { runDir: string }) => {
      const all = (await control(o.runDir, 'list')).instances as { name: string; node?: string }[];
      const node = all.find((i) => i.name === name(n))?.node;
      if (!node) throw new VtpmError('ENOENT', `instance ${n} is not running (vtpm start ${n})`);
      // Loaded here: its mount-namespace binding (koffi) costs every other command ~30 ms.
      const { execWithNode } = await import('../support/private-dev.ts');
      process.exitCode = await execWithNode(node, command);
    });
  program
    .command('list')
    .description("the host's instances")
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output')
    .action(async (o: { runDir: string; json?: boolean }) => {
      const all = (await control(o.runDir, 'list')).instances as { name: string; uuid: string; tpm: string; state: string; created: string; node?: string; reason?: string }[];
      if (o.json) return console.log(JSON.stringify(all));
      if (all.length === 0) return console.log('no instances (create one with: vtpm create NAME)');
      printTable(['NAME', 'TPM', 'STATE', 'UUID', 'NODE', 'LAST PROBLEM'], all.map((i) => [i.name, i.tpm, i.state, i.uuid, i.node ?? '-', i.reason ?? '-']));
    });
}
