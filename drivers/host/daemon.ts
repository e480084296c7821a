// Background processes the CLI and the manager start (manager, authority, vtpmd, tpmfront):
// spawned detached with their output in a log file, and a readiness report sent back over
// an inherited pipe (fd 3) as one CBOR frame (drivers/base/frame.ts), so `vtpm host start`
// and `vtpm start` return only once each piece really serves, with what it reported
// (domid, node path...), or with its error.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { errorFromWire, errorToWire, VtpmError, type WireError } from '../base/errors.ts';
import { encodeFrame, FrameReader, PROTO_VERSION } from '../base/frame.ts';
import { nodeArgs, nodeEnv } from '../base/modules.ts';

const READY_FD = 3;
/** How long a daemon (and a run's whole start-up) may take to report ready. */
export const START_TIMEOUT_MS = 30_000;

export interface DaemonReport {
  ok: boolean;
  info?: Record<string, unknown>;
  error?: WireError;
}

export interface StartedDaemon {
  pid: number;
  info: Record<string, unknown>;
  /** The daemon's stdin when started with `stdin: true` (for a later hand-over). */
  stdin?: NodeJS.WritableStream;
  /** Resolves when the daemon exits while this process lives (a supervisor's cue):
   *  the exit code, or the signal that ended it. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start `node --import tsx <script> args` detached; resolves when it reports ready. */
export function startDaemon(
  script: string,
  args: string[],
  opts: { log: string; timeoutMs?: number; env?: NodeJS.ProcessEnv; stdin?: boolean },
): Promise<StartedDaemon> {
  const timeoutMs = opts.timeoutMs ?? START_TIMEOUT_MS;
  const log = openSync(opts.log, 'a', 0o600);
  const child = spawn(process.execPath, [...nodeArgs(script), script, ...args], {
    detached: true,
    stdio: [opts.stdin ? 'pipe' : 'ignore', log, log, 'pipe'],
    env: nodeEnv(script, { ...opts.env, VTPM_READY_FD: String(READY_FD) }),
  });
  closeSync(log);
  const pipe = child.stdio[READY_FD] as NodeJS.ReadableStream;
  return new Promise<StartedDaemon>((resolve, reject) => {
    const reader = new FrameReader();
    let done = false;
    const finish = (err?: Error, report?: DaemonReport) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      pipe.removeAllListeners('data');
      (pipe as unknown as { destroy(): void }).destroy();
      child.removeAllListeners('exit');
      if (err || !report?.ok) {
        if (child.exitCode === null) child.kill('SIGKILL');
        const e = report?.error;
        const cause = e ? errorFromWire(e) : undefined;
        reject(err ?? new VtpmError(cause?.code ?? 'EIO', `${script} failed to start: ${e?.message ?? 'no reason given'} (log: ${opts.log})`, { cause }));
        return;
      }
      child.unref();
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
      resolve({ pid: child.pid!, info: report.info ?? {}, exited, ...(child.stdin ? { stdin: child.stdin } : {}) });
    };
    const timer = setTimeout(() => finish(new VtpmError('ETIMEDOUT', `${script} did not report ready within ${timeoutMs} ms (log: ${opts.log})`)), timeoutMs);
    pipe.on('data', (d: Buffer) => {
      const first = reader.push(d)[0];
      if (!first) return;
      if ('error' in first) return finish(new VtpmError(first.error.code, `bad readiness report from ${script}`, { cause: first.error }));
      finish(undefined, first.msg as unknown as DaemonReport);
    });
    child.once('exit', (code, signal) =>
      finish(new VtpmError('EIO', `${script} exited (${signal ?? code}) before it was ready (log: ${opts.log})`)),
    );
  });
}

/** In the daemon: tell the starter we serve (or why we cannot). No-op when not started so. */
export function reportReady(report: DaemonReport): void {
  const fd = Number(process.env.VTPM_READY_FD);
  if (!Number.isInteger(fd) || fd < 3) return;
  delete process.env.VTPM_READY_FD;
  try {
    writeSync(fd, encodeFrame({ v: PROTO_VERSION, ...report }));
    closeSync(fd);
  } catch {
    // The starter went away (it timed out or was killed): nobody is left to tell.
  }
}

/** One line the starter hands over on stdin once it knows it (a daemon that reported
 *  ready with its own domid waits here for the other end's). */
export function readLineFromStdin(what: string, timeoutMs: number): Promise<string> {
  return new Promise((resolveLine, reject) => {
    const rl = createInterface({ input: process.stdin });
    // Infinity: wait for as long as the writer keeps stdin open (no timer at all).
    const t = Number.isFinite(timeoutMs) ? setTimeout(() => reject(new VtpmError('ETIMEDOUT', `no ${what} on stdin within ${timeoutMs} ms`)), timeoutMs) : undefined;
    const closed = () => reject(new VtpmError('ECLOSED', `stdin closed before the ${what} arrived`));
    rl.once('line', (line) => {
      clearTimeout(t);
      rl.off('close', closed);
      rl.close();
      resolveLine(line.trim());
    });
    rl.once('close', closed);
  });
}

/** The peer's domid, handed over on stdin (readLineFromStdin). */
export async function readDomidFromStdin(peer: string, timeoutMs: number): Promise<number> {
  return parseDomid(await readLineFromStdin(`${peer} domid`, timeoutMs), peer);
}

export function parseDomid(text: string, peer: string): number {
  const id = Number(text);
  if (!/^\d+$/.test(text) || !Number.isInteger(id)) throw new VtpmError('EINVAL', `bad ${peer} domid ${JSON.stringify(text.slice(0, 40))}`);
  return id;
}

export function reportFailure(e: unknown): void {
  reportReady({ ok: false, error: errorToWire(e) });
}

/** Whether `pid` still runs. A killed daemon whose parent has gone may linger as a zombie
 *  until something reaps it, so signal 0 alone would call it alive: read its state. */
export function alive(pid: number): boolean {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return false;
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  return state !== 'Z' && state !== 'X';
}

/** Wait up to `ms` for `pid` (not our child: no exit event to wait on) to be gone; true if it went. */
export async function waitExit(pid: number, ms: number): Promise<boolean> {
  for (const until = Date.now() + ms; Date.now() < until; await new Promise((r) => setTimeout(r, 20))) {
    if (!alive(pid)) return true;
  }
  return !alive(pid);
}

/** SIGTERM, wait up to `ms`, then SIGKILL; resolves when gone. */
export async function stopProcess(pid: number, ms = 5000): Promise<'exited' | 'killed' | 'absent'> {
  if (!alive(pid)) return 'absent';
  process.kill(pid, 'SIGTERM');
  if (await waitExit(pid, ms)) return 'exited';
  process.kill(pid, 'SIGKILL');
  while (alive(pid)) await new Promise((r) => setTimeout(r, 10));
  return 'killed';
}
