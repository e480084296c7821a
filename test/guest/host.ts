// A host for guest tests, driven through the `vtpm` CLI as a user would: a private run dir,
// state dir and emulated hardware TPM; the manager started (`vtpm host start`) before the
// first guest; guests created, started and stopped through it; everything stopped
// (`vtpm host stop`) and removed at the end.
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Test } from 'tap';

const VTPM = join(import.meta.dirname, '../../scripts/vtpm.sh');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the CLI as a user would: without the test runner's NODE_OPTIONS (tap's process
 *  tracking puts it back into every spawn's environment, hence env -u), plus `env`. */
export function vtpm(args: string[], timeoutMs = 60_000, env: Record<string, string> = {}, netns?: string): Promise<CliResult> {
  const assign = Object.entries(env).map(([k, v]) => `${k}=${v}`);
  const argv = ['-u', 'NODE_OPTIONS', ...assign, VTPM, ...args];
  // In a network namespace (a second host for migration): the manager it starts lives
  // there. nsenter, not `ip netns exec`, which would also give it a mount namespace of its
  // own and hide its guests' nodes from everyone else.
  const [file, all] = netns ? ['nsenter', [`--net=/run/netns/${netns}`, '/usr/bin/env', ...argv]] : ['/usr/bin/env', argv];
  return new Promise((resolve) => {
    execFile(file, all, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** A process's command line, or undefined once it has gone. */
export function cmdline(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return undefined;
  }
}

/** The processes serving a host's run dir (manager, authority, frontd, vtpmds, front
 *  processes): each has `--run-dir DIR` or `--dir DIR` on its command line. */
export function processesOf(runDir: string): number[] {
  return readdirSync('/proc')
    .filter((e) => /^\d+$/.test(e))
    .map(Number)
    .filter((pid) => cmdline(pid)?.some((a, i, argv) => a === runDir && (argv[i - 1] === '--dir' || argv[i - 1] === '--run-dir')));
}

/** A test's end for a host it started: `vtpm host stop`. When that fails, whatever still
 *  serves the run dir is killed (no manager outlives its test and its removed dirs) and the
 *  teardown throws, so the test reports the failed stop instead of hiding it. */
export async function stopHostAfterTest(runDir: string): Promise<void> {
  const r = await vtpm(['host', 'stop', '--run-dir', runDir], 120_000);
  // A stop that reported success leaves nothing behind (a moment for exits to land).
  let left = processesOf(runDir);
  for (let i = 0; r.code === 0 && left.length > 0 && i < 20; i++) {
    await new Promise((res) => setTimeout(res, 100));
    left = processesOf(runDir);
  }
  if (r.code === 0 && left.length === 0) return;
  const what = left.map((p) => `${p} (${cmdline(p)?.find((x) => x.endsWith('.js')) ?? '?'})`);
  for (const pid of left) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // exited meanwhile
    }
  }
  const why = r.code === 0 ? 'reported success but left processes' : `failed (${r.stderr.trim() || `exit ${r.code}`})`;
  throw new Error(`vtpm host stop --run-dir ${runDir} ${why}; killed what was left: ${what.join(', ') || 'nothing'}`);
}

/** A row of `vtpm list --json`; the pieces (vtpmd, front) are there while a run is up. */
export interface InstanceRow {
  name: string;
  uuid: string;
  tpm: '1.2' | '2.0';
  created: string;
  state: 'running' | 'restarting' | 'failed' | 'stopped' | 'suspended' | 'migrating';
  node?: string;
  reason?: string;
  restarts?: number;
  fuse?: 'raw' | 'native';
  vtpmd?: { pid: number; domid: number };
  front?: { pid: number; domid: number };
}

/** One command through the node with plain system calls: open, write, read, close. */
export function transact(node: string, cmd: Uint8Array): Buffer {
  const fd = openSync(node, 'r+');
  try {
    writeSync(fd, cmd);
    const buf = Buffer.alloc(4096);
    return buf.subarray(0, readSync(fd, buf, 0, buf.length, null));
  } finally {
    closeSync(fd);
  }
}

export class TestHost {
  /** The host's run dir: manager.sock, authority, DIR/NAME/{dev/tpm0,vtpmd.log,front.log}. */
  readonly dir: string;
  /** The manager's state dir (root.sealed, table, instances/<uuid>/<blob>). */
  readonly stateDir: string;
  /** The emulated hardware TPM's NVRAM (tis:DIR). */
  readonly hwDir: string;
  private readonly base: string;
  private up: Promise<void> | null = null;
  private readonly created = new Set<string>();

  /** A network namespace the manager runs in, and the address it takes migrations on. */
  readonly netns?: string;
  readonly listen?: string;

  readonly warm?: number;

  constructor(t: Test, o: { netns?: string; listen?: string; warm?: number } = {}) {
    this.netns = o.netns;
    this.listen = o.listen;
    this.warm = o.warm;
    this.base = mkdtempSync(join(tmpdir(), 'vtpm-host-'));
    this.dir = join(this.base, 'run');
    this.stateDir = join(this.base, 'state');
    this.hwDir = join(this.base, 'hwtpm');
    t.teardown(async () => {
      try {
        if (this.up) await stopHostAfterTest(this.dir);
      } finally {
        rmSync(this.base, { recursive: true, force: true });
      }
    });
  }

  /** `--run-dir DIR`, for the instance commands. */
  get args(): string[] {
    return ['--run-dir', this.dir];
  }

  /** `vtpm host start` once, before the first guest (`env` for the CLI that starts it). */
  hostStart(env: Record<string, string> = {}): Promise<void> {
    return (this.up ??= (async () => {
      const listen = [...(this.listen ? ['--migration-listen', this.listen] : []), ...(this.warm !== undefined ? ['--warm', String(this.warm)] : [])];
      const r = await vtpm(['host', 'start', '--state-dir', this.stateDir, '--hw', `tis:${this.hwDir}`, ...listen, ...this.args], 120_000, env, this.netns);
      if (r.code !== 0) throw new Error(`vtpm host start failed: ${r.stderr.trim()}`);
    })());
  }

  /** `vtpm create` (the first time) and `vtpm start --fuse`; returns the node path it printed
   *  (fails the test otherwise). */
  async start(t: Test, name: string, tpm: '1.2' | '2.0', fuse: 'raw' | 'native' = 'raw', env: Record<string, string> = {}): Promise<string> {
    await this.hostStart(env);
    if (!this.created.has(name)) {
      const c = await vtpm(['create', name, '--tpm', tpm, ...this.args], 60_000, env);
      if (c.code !== 0) throw new Error(`vtpm create ${name} failed: ${c.stderr.trim()}`);
      this.created.add(name);
    }
    const r = await vtpm(['start', name, '--fuse', fuse, ...this.args], 120_000, env);
    if (r.code !== 0) throw new Error(`vtpm start ${name} failed: ${r.stderr.trim()}`);
    const node = r.stdout.trim();
    t.equal(node, join(this.dir, name, 'dev', 'tpm0'), `guest ${name} node at RUN/${name}/dev/tpm0`);
    const row = await this.row(name);
    const frontArgv = row.front ? readFileSync(`/proc/${row.front.pid}/cmdline`, 'utf8').split('\0') : [];
    // raw: the host's one front-end process (frontd); native: a front process of its own.
    const serves = fuse === 'raw' ? frontArgv.some((a) => a.endsWith('tpmfront/frontd.js')) : frontArgv.join(' ').includes(`--fuse ${fuse}`);
    t.ok(row.fuse === fuse && serves, `guest ${name} runs the ${fuse} front end`);
    return node;
  }

  /** `vtpm host stop` (every instance, the manager, the authority), then `vtpm host start`:
   *  instances come back stopped. */
  async hostRestart(t: Test): Promise<void> {
    const r = await vtpm(['host', 'stop', ...this.args], 120_000);
    t.equal(r.code, 0, `vtpm host stop${r.code ? `: ${r.stderr.trim()}` : ''}`);
    this.up = null;
    await this.hostStart();
  }

  /** After the manager was killed: `vtpm host start` again (the authority and the runs it
   *  left are picked up by the new manager). */
  async restartAfterCrash(t: Test): Promise<void> {
    this.up = null;
    await this.hostStart();
    t.pass('manager restarted after the crash');
  }

  async stop(t: Test, name: string): Promise<void> {
    const r = await vtpm(['stop', name, ...this.args], 120_000);
    t.equal(r.code, 0, `vtpm stop ${name}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  }

  async list(): Promise<InstanceRow[]> {
    const r = await vtpm(['list', '--json', ...this.args]);
    if (r.code !== 0) throw new Error(`vtpm list failed: ${r.stderr}`);
    return JSON.parse(r.stdout);
  }

  /** The list row of `name` (fails when there is none). */
  async row(name: string): Promise<InstanceRow> {
    const row = (await this.list()).find((i) => i.name === name);
    if (!row) throw new Error(`vtpm list has no ${name}`);
    return row;
  }
}
