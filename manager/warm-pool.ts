// The warm pool: vtpmd processes started before any instance needs one (`vtpmd --warm`:
// Node, the modules and the domain are up), so a start hands an instance
// to a waiting process instead of paying for a process start (most of a cold start). A
// taken process is replaced in the background. Waiting processes are idle (no timers) and
// end by themselves when the manager goes (their stdin closes). QEMU guests start cold.
import { mkdirSync, rmSync } from 'node:fs';
import { setPriority as osSetPriority } from 'node:os';
import { join } from 'node:path';
import { builtScript } from '../drivers/base/modules.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon, START_TIMEOUT_MS } from '../drivers/host/daemon.ts';

export const DEFAULT_WARM = 2;
/** A pool is a few processes (each ~25 MB): a bound, not a density knob. */
export const MAX_WARM = 64;
/** Retry delays after a warm start failed (a broken install must not spin). */
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 60_000;
const WAITING_NICE = 10;

function setPriority(pid: number, nice: number): void {
  try {
    osSetPriority(pid, nice);
  } catch {
    // it exited meanwhile: take() and the exit handler deal with that
  }
}

interface Waiting {
  daemon: StartedDaemon;
  log: string;
}

export class WarmPool {
  private readonly waiting: Waiting[] = [];
  private starting = 0;
  private seq = 0;
  private retryMs = RETRY_MIN_MS;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly dir: string;

  constructor(private readonly o: { runDir: string; size: number; log: (line: string) => void }) {
    this.dir = join(o.runDir, 'warm');
  }

  get size(): number {
    return this.o.size;
  }

  /** The processes waiting now. */
  get pids(): number[] {
    return this.waiting.map((w) => w.daemon.pid);
  }

  /** A waiting vtpmd (its stdin open, ready for "NAME TPM UUID MANAGER FRONT"), or none
   *  (pool empty: the caller starts one cold). The caller refills (fill()) once its start is
   *  done: a replacement starting meanwhile would take a core from the start it serves. */
  take(): StartedDaemon | undefined {
    let got: Waiting | undefined;
    while ((got = this.waiting.shift()) && !alive(got.daemon.pid)) rmSync(got.log, { force: true });
    if (!got) return undefined;
    // From here on it logs to its instance's log (it moves its stdout/stderr there), and it
    // serves a guest: back to normal priority.
    rmSync(got.log, { force: true });
    setPriority(got.daemon.pid, 0);
    return got.daemon;
  }

  /** Start processes up to the pool's size, one at a time (a start takes a core for
   *  ~150 ms; starting several at once would slow the guests' own start). */
  fill(): void {
    if (this.closed || this.retryTimer || this.starting > 0 || this.waiting.length >= this.o.size) return;
    this.starting++;
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const log = join(this.dir, `vtpmd-${++this.seq}.log`);
    startDaemon(builtScript('vtpmd/main'), ['--dir', this.o.runDir, '--warm'], { log, timeoutMs: START_TIMEOUT_MS, stdin: true }).then(
      (daemon) => {
        this.starting--;
        this.retryMs = RETRY_MIN_MS;
        if (this.closed) return void stopProcess(daemon.pid);
        // While it only waits, it yields to the running guests (its own start too).
        setPriority(daemon.pid, WAITING_NICE);
        const w = { daemon, log };
        this.waiting.push(w);
        // One that dies while it waits (killed by hand, its authority gone) leaves the pool.
        void daemon.exited.then(() => {
          const i = this.waiting.indexOf(w);
          if (i < 0) return;
          this.waiting.splice(i, 1);
          rmSync(log, { force: true });
          this.fill();
        });
        this.fill();
      },
      (e: Error) => {
        this.starting--;
        if (this.closed) return;
        this.o.log(`warm pool: a vtpmd did not start: ${e.message}; next try in ${this.retryMs} ms`);
        this.retryTimer = setTimeout(() => {
          this.retryTimer = undefined;
          this.fill();
        }, this.retryMs);
        this.retryTimer.unref();
        this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
      },
    );
  }

  /** The authority was replaced: the waiting processes belong to the old one. */
  async renew(): Promise<void> {
    await this.drain();
    this.fill();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.retryTimer);
    await this.drain();
  }

  private async drain(): Promise<void> {
    const all = this.waiting.splice(0);
    await Promise.all(all.map(async (w) => {
      await stopProcess(w.daemon.pid);
      rmSync(w.log, { force: true });
    }));
  }
}
