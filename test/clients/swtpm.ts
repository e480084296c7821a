// A `swtpm socket` for one test: TCP on loopback, ports below 32768 (a connect to an
// unused ephemeral port on loopback can connect to itself and echo the command back),
// a private state dir, started up (startup-clear) and killed on the test's teardown.

import { spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer } from 'node:net';
import { scratchDir, sleep, type Tap } from './run.ts';

export interface Swtpm {
  version: '1.2' | '2.0';
  host: string;
  port: number;
  ctrlPort: number;
  /** TCTI string for tpm2-tools (only meaningful for 2.0) */
  tcti: string;
  stateDir: string;
  pid: number;
  log: () => string;
  /** stop it now (state stays in stateDir for a restart); teardown does it otherwise */
  stop: () => Promise<void>;
}

const HOST = '127.0.0.1';

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, HOST, () => s.close(() => resolve(true)));
  });
}

/** A pair (p, p+1) both free now, picked at random in 20000..31998 (below the ephemeral range). */
export async function freePortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const p = 20000 + 2 * Math.floor(Math.random() * 5999);
    if ((await portFree(p)) && (await portFree(p + 1))) return p;
  }
  throw new Error('no free TCP port pair below 32768 on loopback');
}

export function canConnect(port: number, host = HOST): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect({ port, host });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export async function waitForPort(port: number, child: ChildProcess, timeoutMs: number, what: string, log: () => string): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${what} exited (${child.exitCode ?? child.signalCode}) before listening on ${port}:\n${log()}`);
    }
    if (await canConnect(port)) return;
    await sleep(20);
  }
  throw new Error(`${what} not listening on ${port} after ${timeoutMs} ms:\n${log()}`);
}

/** Stop a child we started: SIGTERM, then SIGKILL if it lingers; resolves once it is gone. */
export async function stopChild(child: ChildProcess, graceMs = 2000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await gone;
  clearTimeout(timer);
}

/** opts.stateDir: reuse the state of an earlier swtpm (a "power cycle" of the same TPM). */
export async function startSwtpm(t: Tap, version: '1.2' | '2.0' = '2.0', opts: { stateDir?: string } = {}): Promise<Swtpm> {
  const stateDir = opts.stateDir ?? scratchDir(t, 'swtpm');
  let lastErr: unknown;
  // a port picked free can be taken before swtpm binds it: retry with another pair
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePortPair();
    const args = [
      'socket',
      ...(version === '2.0' ? ['--tpm2'] : []),
      '--server', `type=tcp,port=${port},bindaddr=${HOST}`,
      '--ctrl', `type=tcp,port=${port + 1},bindaddr=${HOST}`,
      '--tpmstate', `dir=${stateDir}`,
      '--flags', 'not-need-init,startup-clear',
    ];
    const child = spawn('swtpm', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
    const log = (): string => out;
    try {
      await waitForPort(port, child, 5000, 'swtpm', log);
    } catch (e) {
      lastErr = e;
      await stopChild(child);
      continue;
    }
    // registered after the scratch dir, so it runs first (teardowns run in reverse)
    t.teardown(() => stopChild(child));
    return {
      version,
      host: HOST,
      port,
      ctrlPort: port + 1,
      tcti: `swtpm:host=${HOST},port=${port}`,
      stateDir,
      pid: child.pid!,
      log,
      stop: () => stopChild(child),
    };
  }
  throw lastErr;
}
