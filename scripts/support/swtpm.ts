// The comparison TPM: a `swtpm socket` on loopback TCP, for tests and benchmarks alike.
// Ports are picked below 32768 (a connect to an unused ephemeral port on loopback can
// connect to itself and echo the command back), started up (startup-clear).
//   const sw = await launchSwtpm('2.0', stateDir);  ...  await sw.stop();
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer } from 'node:net';

export const HOST = '127.0.0.1';

export interface SwtpmProcess {
  version: '1.2' | '2.0';
  proc: ChildProcess;
  port: number;
  ctrlPort: number;
  /** TCTI string for tpm2-tools (only meaningful for 2.0). */
  tcti: string;
  stateDir: string;
  /** What swtpm printed so far. */
  log: () => string;
  /** SIGTERM (SIGKILL if it lingers); resolves once it is gone. The state dir stays. */
  stop: () => Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

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

/** Wait until `child` listens on `port`; throws with its log if it exits or times out. */
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

/** Start swtpm on a free port pair keeping its state in `stateDir` (reuse one for a power cycle). */
export async function launchSwtpm(version: '1.2' | '2.0', stateDir: string): Promise<SwtpmProcess> {
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
    const proc = spawn('swtpm', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    proc.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    proc.stderr!.on('data', (b: Buffer) => (out += b.toString()));
    const log = (): string => out;
    try {
      await waitForPort(port, proc, 5000, 'swtpm', log);
    } catch (e) {
      lastErr = e;
      await stopChild(proc);
      continue;
    }
    return { version, proc, port, ctrlPort: port + 1, tcti: `swtpm:host=${HOST},port=${port}`, stateDir, log, stop: () => stopChild(proc) };
  }
  throw lastErr;
}
