// Shared benchmark plumbing: timing, percentiles, the comparison table, and a swtpm
// started for the run (the comparison every data-path figure is measured against), the C
// client loop, and what a process costs (CPU, PSS, context switches, from /proc).

const here = new URL('.', import.meta.url).pathname;
import { parseHeader, TPM_HEADER_SIZE } from '../../drivers/tpm/command.ts';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { launchSwtpm, type SwtpmProcess } from '../support/swtpm.ts';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Stats {
  n: number;
  median: number;
  p99: number;
  mean: number;
}

/** Median/p99/mean of samples in µs. */
export function stats(samplesUs: Float64Array | number[]): Stats {
  const s = Float64Array.from(samplesUs).sort();
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
  let sum = 0;
  for (const v of s) sum += v;
  return { n: s.length, median: at(0.5), p99: at(0.99), mean: sum / s.length };
}

/** Time `n` runs of a synchronous step, after `warmup` untimed ones; µs per run. */
export function timeSync(n: number, step: () => void, warmup = Math.min(200, n)): Stats {
  for (let i = 0; i < warmup; i++) step();
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    step();
    out[i] = Number(process.hrtime.bigint() - t0) / 1000;
  }
  return stats(out);
}

export async function timeAsync(n: number, step: () => Promise<unknown>, warmup = Math.min(200, n)): Promise<Stats> {
  for (let i = 0; i < warmup; i++) await step();
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    await step();
    out[i] = Number(process.hrtime.bigint() - t0) / 1000;
  }
  return stats(out);
}

export interface Row {
  what: string;
  ours: Stats;
  /** The comparison measured in the same run. */
  base: Stats;
  baseName: string;
  /** Target ratio (ours/base median), if the issue sets one. */
  target?: number;
}

const f = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));

/** Print our figure beside its comparison, as ratios, with the target verdict. */
export function printTable(title: string, rows: Row[]): void {
  console.log(`\n## ${title}\n`);
  console.log('| measurement | ours median µs | ours p99 µs | comparison | comp. median µs | comp. p99 µs | ratio median | ratio p99 | target |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    const rm = r.ours.median / r.base.median;
    const rp = r.ours.p99 / r.base.p99;
    const verdict = r.target === undefined ? '' : `≤ ${r.target}× ${rm <= r.target ? 'met' : 'MISSED'}`;
    console.log(
      `| ${r.what} | ${f(r.ours.median)} | ${f(r.ours.p99)} | ${r.baseName} | ${f(r.base.median)} | ${f(r.base.p99)} | ${rm.toFixed(2)} | ${rp.toFixed(2)} | ${verdict} |`,
    );
  }
}

/** A `swtpm socket` on loopback for the run (scripts/support/swtpm.ts), state in a temp dir. */
export class Swtpm {
  private constructor(private readonly sw: SwtpmProcess) {}

  static async start(version: '1.2' | '2.0'): Promise<Swtpm> {
    const dir = mkdtempSync(join(tmpdir(), 'vtpm-bench-swtpm-'));
    try {
      return new Swtpm(await launchSwtpm(version, dir));
    } catch (e) {
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  get proc(): ChildProcess {
    return this.sw.proc;
  }
  get port(): number {
    return this.sw.port;
  }

  /** A connected client that sends one command and waits for its whole response. */
  async client(): Promise<TcpTpmClient> {
    return TcpTpmClient.connect(this.port);
  }

  async stop(): Promise<void> {
    await this.sw.stop();
    rmSync(this.sw.stateDir, { recursive: true, force: true });
  }
}

/** TPM command/response over TCP (swtpm's data port), framed by the response header. Kept
 *  leaner than drivers/tpm/socket-transport.ts (no queue, no timeouts) so the swtpm
 *  comparison row carries no overhead of ours. */
export class TcpTpmClient {
  private pending?: (b: Buffer) => void;
  private buf = Buffer.alloc(0);
  private constructor(private readonly sock: net.Socket) {
    sock.setNoDelay(true);
    sock.on('data', (d) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      if (this.buf.length >= TPM_HEADER_SIZE && this.buf.length >= parseHeader(this.buf, 'swtpm response', { whole: false }).size) {
        const resp = this.buf;
        this.buf = Buffer.alloc(0);
        const p = this.pending;
        this.pending = undefined;
        p?.(resp);
      }
    });
  }
  static connect(port: number): Promise<TcpTpmClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => resolve(new TcpTpmClient(s)));
      s.once('error', reject);
    });
  }
  transmit(cmd: Uint8Array): Promise<Buffer> {
    return new Promise((resolve) => {
      this.pending = resolve;
      this.sock.write(cmd);
    });
  }
  close(): void {
    this.sock.destroy();
  }
}

/** Run `main` when the file is executed directly (not when imported by all.ts). */
export function isMain(metaUrl: string): boolean {
  return metaUrl === `file://${process.argv[1]}`;
}

/** The C client loop (support/SOURCE.c), compiled for this run. */
export function buildClient(source = 'tpmclient'): string {
  const out = join(tmpdir(), `vtpm-${source}-${process.pid}`);
  execFileSync('gcc', ['-O2', '-o', out, join(here, 'support', `${source}.c`)]);
  return out;
}


/** CPU time (µs) a process has used: utime + stime from /proc. */
export function cpuUs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1e6) / 100; // USER_HZ = 100
}

export function pssKb(pid: number): number {
  const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return Number(m?.[1] ?? NaN);
}

/** Context switches (voluntary + involuntary) of every thread of a process so far. */
export function switches(pid: number): number {
  let n = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const st = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    for (const m of st.matchAll(/^(?:non)?voluntary_ctxt_switches:\s+(\d+)/gm)) n += Number(m[1]);
  }
  return n;
}

export interface Concurrent {
  /** Aggregate commands/s. */
  rate: number;
  /** Context switches per command: the clients' and the servers' (every thread). */
  clientSwitches: number;
  serverSwitches: number;
}

/** `targets` driven at once, each by its own client process; `serverPids` serve them. */
export async function concurrent(client: string, targets: { kind: 'dev' | 'tcp'; target: string }[], cmdHex: string, n: number, serverPids: number[]): Promise<Concurrent> {
  const swBefore = serverPids.map(switches);
  const t0 = process.hrtime.bigint();
  const outs = await Promise.all(
    targets.map(
      (x) =>
        new Promise<number[]>((resolve, reject) => {
          const p = spawn(client, [x.kind, x.target, String(n), cmdHex], { stdio: ['ignore', 'pipe', 'inherit'] });
          let out = '';
          p.stdout!.on('data', (d) => (out += String(d)));
          p.once('exit', (c) => (c === 0 ? resolve(out.trim().split(' ').map(Number)) : reject(new Error(`client on ${x.target} exited ${c}`))));
        }),
    ),
  );
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  const commands = targets.length * (n + Math.floor(n / 10)); // each client also runs n/10 warm-up commands
  return {
    rate: commands / s,
    clientSwitches: outs.reduce((a, o) => a + o[3]!, 0) / outs.length,
    serverSwitches: serverPids.reduce((a, p, i) => a + switches(p) - swBefore[i]!, 0) / commands,
  };
}

