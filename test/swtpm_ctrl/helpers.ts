// Test helpers: start the standalone server (drivers/swtpm_ctrl/serve-main.ts) as a child
// process, drive it with the real `swtpm_ioctl`, raw control frames and TPM commands.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO_ROOT, nodeArgs } from '../../drivers/base/modules.ts';
import { stopChild } from '../../scripts/support/swtpm.ts';

export const SERVE_MAIN = join(REPO_ROOT, 'drivers/swtpm_ctrl/serve-main.ts');

export interface Served {
  dir: string;
  ctrl: string;
  data: string;
  state: string;
  proc: ChildProcess;
  qemu: string[];
  log: () => string;
  alive: () => boolean;
  /** Resolves with the exit code once the process is gone. */
  exited: Promise<number | null>;
  stop: () => Promise<void>;
}

export async function serve(opts: { tpm?: '1.2' | '2.0'; args?: string[]; state?: string; dir?: string } = {}): Promise<Served> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), 'swtpm-ctrl-'));
  const ctrl = join(dir, 'ctrl');
  const data = join(dir, 'data');
  const state = opts.state ?? join(dir, 'state');
  const args = ['--tpm', opts.tpm ?? '2.0', '--ctrl', ctrl, '--server', data, '--state', state, '-v', ...(opts.args ?? [])];
  const proc = spawn(process.execPath, [...nodeArgs(SERVE_MAIN), SERVE_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd: REPO_ROOT });
  let out = '';
  let err = '';
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  const line = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${err}`)), 20000);
    proc.stdout!.on('data', (b: Buffer) => {
      out += b.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(out.slice(0, nl));
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code}) before ready:\n${out}\n${err}`));
    });
  });
  const ready = JSON.parse(line) as { ok: boolean; error?: string; qemu: string[] };
  if (!ready.ok) throw new Error(`server failed: ${ready.error}`);
  return {
    dir,
    ctrl,
    data,
    state,
    proc,
    qemu: ready.qemu,
    log: () => err,
    alive: () => proc.exitCode === null && proc.signalCode === null,
    exited,
    stop: async () => {
      await stopChild(proc, 5000);
      if (!opts.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** swtpm_ioctl --unix CTRL ARGS... */
export function ioctl(ctrl: string, ...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    execFile('swtpm_ioctl', ['--unix', ctrl, ...args], { timeout: 20000 }, (e, stdout, stderr) => {
      const code = e ? (typeof (e as { code?: unknown }).code === 'number' ? ((e as { code: number }).code) : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

/** A connected unix socket and what it has received so far (`waiter` runs on each arrival). */
async function openSocket(path: string): Promise<{ sock: Socket; inbox: { got: Buffer; waiter: (() => void) | null } }> {
  const sock = connect(path);
  await new Promise<void>((r, j) => {
    sock.once('connect', () => r());
    sock.once('error', j);
  });
  const inbox: { got: Buffer; waiter: (() => void) | null } = { got: Buffer.alloc(0), waiter: null };
  sock.on('data', (b: Buffer) => {
    inbox.got = Buffer.concat([inbox.got, b]);
    inbox.waiter?.();
  });
  return { sock, inbox };
}

/** Send raw bytes on a fresh control connection (or `parts` with pauses between), collect
 *  what comes back until `expect` bytes arrived or `waitMs` passed. */
export async function rawCtrl(ctrl: string, parts: Uint8Array[], opts: { expect?: number; waitMs?: number; pauseMs?: number; then?: Uint8Array; thenExpect?: number; thenDelayMs?: number } = {}): Promise<{ first: Buffer; second?: Buffer }> {
  const { sock, inbox } = await openSocket(ctrl);
  const collect = (n: number | undefined, ms: number) =>
    new Promise<Buffer>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        inbox.waiter = null;
        const g = inbox.got;
        inbox.got = Buffer.alloc(0);
        resolve(g);
      };
      const timer = setTimeout(done, ms);
      inbox.waiter = () => {
        if (n !== undefined && inbox.got.length >= n) done();
      };
      inbox.waiter();
    });
  for (const [i, p] of parts.entries()) {
    if (i > 0 && opts.pauseMs) await new Promise((r) => setTimeout(r, opts.pauseMs));
    sock.write(p);
  }
  const first = await collect(opts.expect, opts.waitMs ?? 3000);
  let second: Buffer | undefined;
  if (opts.then) {
    if (opts.thenDelayMs) await new Promise((r) => setTimeout(r, opts.thenDelayMs));
    sock.write(opts.then);
    second = await collect(opts.thenExpect, opts.waitMs ?? 3000);
  }
  sock.destroy();
  return { first, second };
}

/** A connection to the `--server` data socket that sends TPM commands and reads responses. */
export async function dataClient(path: string): Promise<{ send: (cmd: Uint8Array, expect?: number) => Promise<Buffer>; close: () => void }> {
  const { sock, inbox } = await openSocket(path);
  return {
    send: (cmd, expect) =>
      new Promise<Buffer>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no complete response (have ${inbox.got.length} bytes)`)), 10000);
        inbox.waiter = () => {
          const got = inbox.got;
          const need = expect ?? (got.length >= 6 ? got.readUInt32BE(2) : Infinity);
          if (got.length >= need) {
            clearTimeout(timer);
            inbox.waiter = null;
            const r = got.subarray(0, need);
            inbox.got = got.subarray(need);
            resolve(Buffer.from(r));
          }
        };
        sock.write(cmd);
      }),
    close: () => sock.destroy(),
  };
}

export const be32 = (...v: number[]) => {
  const b = Buffer.alloc(4 * v.length);
  v.forEach((x, i) => b.writeUInt32BE(x >>> 0, 4 * i));
  return b;
};
export const rcOf = (resp: Uint8Array) => Buffer.from(resp).readUInt32BE(6);

/** Resend on TPM_RC_RETRY, as a TSS and the kernel do (libtpms answers the first NV_Write
 *  of an index with it). */
export async function sendRetry(d: { send: (c: Uint8Array) => Promise<Buffer> }, cmd: Uint8Array): Promise<Buffer> {
  for (let i = 0; ; i++) {
    const r = await d.send(cmd);
    if (rcOf(r) !== 0x922 || i === 5) return r;
  }
}

