// Running real client binaries for the acceptance batteries: argument arrays (no shell),
// a hard timeout on every call (a wedged TPM node must fail a step, never hang CI), and
// the captured output kept so a failing step shows what the tool said.

import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Test } from 'tap';

export type Tap = Test;

export interface ToolResult {
  cmd: string;
  args: string[];
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
  timedOut: boolean;
  ms: number;
}

export interface ToolOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  /** bytes written to the tool's stdin; stdin is closed either way (no terminal in CI) */
  input?: string | Buffer;
}

export const DEFAULT_TOOL_TIMEOUT_MS = 30_000;

export function runTool(cmd: string, args: string[], opts: ToolOptions = {}): Promise<ToolResult> {
  const started = Date.now();
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TOOL_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.stdin.on('error', () => {}); // a tool that exits before reading stdin is not our failure
    child.stdin.end(opts.input ?? '');
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const stdoutBytes = Buffer.concat(out);
      resolve({
        cmd,
        args,
        code,
        signal,
        stdout: stdoutBytes.toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        stdoutBytes,
        timedOut,
        ms: Date.now() - started,
      });
    });
  });
}

/** One line per tool run for a failing step's diagnostics; stdout/stderr trimmed to the tail. */
export function describe(r: ToolResult): string {
  const tail = (s: string): string => (s.length > 4000 ? '…' + s.slice(-4000) : s);
  const how = r.timedOut ? 'TIMED OUT (killed)' : r.signal ? `signal ${r.signal}` : `exit ${r.code}`;
  return `$ ${r.cmd} ${r.args.join(' ')}\n-> ${how} after ${r.ms} ms\n--- stdout\n${tail(r.stdout)}\n--- stderr\n${tail(r.stderr)}`;
}

export class ToolFailed extends Error {
  readonly result: ToolResult;
  constructor(r: ToolResult) {
    super(`${r.cmd} failed\n${describe(r)}`);
    this.name = 'ToolFailed';
    this.result = r;
  }
}

/** Run and require exit 0; the thrown error carries the whole transcript. */
export async function mustRun(cmd: string, args: string[], opts: ToolOptions = {}): Promise<ToolResult> {
  const r = await runTool(cmd, args, opts);
  if (r.code !== 0 || r.timedOut) throw new ToolFailed(r);
  return r;
}

/**
 * A private (0700) scratch directory, removed on the test's teardown. Removed off the main
 * thread: a FUSE node mounted below it is served by this process's main thread, and a
 * synchronous call into it from that thread would deadlock the process (uninterruptibly).
 */
export function scratchDir(t: Tap, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `vtpm-${prefix}-`));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
