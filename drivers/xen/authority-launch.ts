// Reaching the authority from outside: is one running for DIR, and starting one as a child
// process (tests, benchmarks; the toolstack starts it detached). The daemon is authority.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { VtpmError } from '../base/errors.ts';
import { nodeArgs, nodeEnv, REPO_ROOT, sibling } from '../base/modules.ts';
import { FrameReader, PROTO_VERSION, encodeFrame } from '../base/frame.ts';
import { socketPath } from './layout.ts';

/** True when an authority answers on DIR's socket. */
export async function authorityRunning(dir: string, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath(dir));
    const reader = new FrameReader();
    const t = setTimeout(() => done(false), timeoutMs);
    const done = (v: boolean): void => {
      clearTimeout(t);
      s.destroy();
      resolve(v);
    };
    s.on('error', () => done(false));
    s.on('connect', () => s.write(encodeFrame({ v: PROTO_VERSION, id: 1, op: 'ping' })));
    s.on('data', (c) => {
      for (const r of reader.push(c)) if ('msg' in r && r.msg.ok === true) return done(true);
      done(false);
    });
  });
}

export interface AuthorityProcess {
  readonly pid: number;
  readonly dir: string;
  readonly child: ChildProcess;
  stop(): Promise<void>;
}

/** Spawn the authority for `dir` as a child process and wait until it answers. Unless
 *  `outliveParent` is set, the authority exits when this process dies (checked each second). */
export async function startAuthority(dir: string, timeoutMs = 15000, opts: { outliveParent?: boolean } = {}): Promise<AuthorityProcess> {
  const extra = opts.outliveParent ? [] : ['--parent', String(process.pid)];
  const script = fileURLToPath(sibling(import.meta.url, './authority'));
  const child = spawn(process.execPath, [...nodeArgs(script), script, '--dir', dir, ...extra], {
    env: nodeEnv(script),
    cwd: REPO_ROOT,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (c) => (stderr += String(c)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new VtpmError('EIO', `authority exited: ${stderr.trim()}`);
    if (await authorityRunning(dir, 500)) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new VtpmError('ETIMEDOUT', `authority for ${dir} did not answer: ${stderr.trim()}`);
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
