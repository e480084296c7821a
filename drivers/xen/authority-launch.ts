// Reaching the authority from outside: is one running for DIR, and starting one, either
// tied to this process (tests, benchmarks) or detached with a log file (the manager's,
// which outlives the CLI). The daemon is authority.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import { readBounded, writeFileAtomic } from '../host/state-dir.ts';
import { VtpmError } from '../base/errors.ts';
import { codeFile, nodeArgs, nodeEnv, REPO_ROOT } from '../base/modules.ts';
import { RpcClient } from '../base/rpc.ts';
import { socketPath } from './layout.ts';

/** True when an authority answers on DIR's socket. */
export async function authorityRunning(dir: string, timeoutMs = 1000): Promise<boolean> {
  const c = await RpcClient.connect(socketPath(dir), `the authority at ${dir}`).catch(() => null);
  if (!c) return false;
  try {
    await c.request('ping', {}, timeoutMs);
    return true;
  } catch {
    return false;
  } finally {
    c.destroy(); // not end(): a hung authority must not keep us waiting for its close
  }
}

export interface AuthorityProcess {
  readonly pid: number;
  readonly dir: string;
  readonly child: ChildProcess;
  stop(): Promise<void>;
}

export interface AuthorityLaunch {
  /** 'child' (default): the authority exits when this process dies (it checks each second).
   *  'detached': its own process group, not waited for by this process; needs `log`. */
  lifetime?: 'child' | 'detached';
  /** Where a detached authority's stdout and stderr go (appended, mode 0600). */
  log?: string;
  /** The daemon's entry (default: authority.ts/.js beside this file; the manager passes
   *  the built one). */
  script?: string;
  /** How long to wait for it to answer (default 15 s). */
  timeoutMs?: number;
}

const RECORD = 'host.cbor';
const RECORD_VERSION = 1;

/** An authority for `dir` that outlives its starter (the manager's):
 *  started detached, logging to DIR/authority.log, unless one already answers. Its pid is
 *  recorded in DIR/host.cbor for authorityPid(). */
export async function ensureAuthority(dir: string, script: string): Promise<void> {
  if (await authorityRunning(dir)) return;
  const a = await startAuthority(dir, { lifetime: 'detached', log: join(dir, 'authority.log'), script });
  writeFileAtomic(join(dir, RECORD), encode({ v: RECORD_VERSION, authority: a.pid }));
}

/** The pid recorded by ensureAuthority, if any; the record is removed with `forget`. */
export function authorityPid(dir: string, forget = false): number | undefined {
  const file = join(dir, RECORD);
  const bytes = readBounded(file, 4096, 'the authority record');
  if (forget) rmSync(file, { force: true });
  if (!bytes) return undefined;
  const rec = decode(bytes) as { v?: unknown; authority?: unknown };
  return rec?.v === RECORD_VERSION && Number.isInteger(rec.authority) ? (rec.authority as number) : undefined;
}

/** Spawn the authority for `dir` and wait until it answers. */
export async function startAuthority(dir: string, opts: AuthorityLaunch = {}): Promise<AuthorityProcess> {
  const detached = opts.lifetime === 'detached';
  if (detached && !opts.log) throw new VtpmError('EINVAL', 'a detached authority needs a log file');
  const script = opts.script ?? codeFile('drivers/xen/authority');
  const args = [...nodeArgs(script), script, '--dir', dir, ...(detached ? [] : ['--parent', String(process.pid)])];
  const logFd = detached ? openSync(opts.log!, 'a', 0o600) : -1;
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, args, {
      env: nodeEnv(script),
      cwd: REPO_ROOT,
      detached,
      stdio: detached ? ['ignore', logFd, logFd] : ['ignore', 'ignore', 'pipe'],
    });
  } finally {
    if (logFd >= 0) closeSync(logFd);
  }
  let stderr = '';
  child.stderr?.on('data', (c) => (stderr += String(c)));
  const why = (): string => (detached ? `see ${opts.log}` : stderr.trim());
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  if (detached) child.unref();
  const deadline = Date.now() + (opts.timeoutMs ?? 15_000);
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new VtpmError('EIO', `authority for ${dir} exited: ${why()}`);
    if (await authorityRunning(dir, 500)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new VtpmError('ETIMEDOUT', `authority for ${dir} did not answer: ${why()}`);
    }
    await new Promise((r) => setTimeout(r, 30));
  }
  return {
    pid: child.pid!,
    dir,
    child,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}
