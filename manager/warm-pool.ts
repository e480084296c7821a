// The warm pool: vtpmd processes started before any instance needs one (`vtpmd --warm`:
// Node, the modules and the domain are up, and its state link to the manager is connected),
// so a start hands an instance to a waiting process instead of paying for a process start
// and a xenbus handshake. The manager's back end of a waiting process's state link serves
// nothing: a run hands it to the state thread, bound to its instance, once it is taken. A
// taken process is replaced in the background. Waiting processes are idle (no timers) and
// end by themselves when the manager goes (their stdin closes). QEMU guests start cold.
import { mkdirSync, rmSync } from 'node:fs';
import { setPriority as osSetPriority } from 'node:os';
import { join } from 'node:path';
import { builtScript } from '../drivers/base/modules.ts';
import { VtpmError } from '../drivers/base/errors.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon, START_TIMEOUT_MS } from '../drivers/host/daemon.ts';
import { XenbusBack, type BackLink } from '../drivers/tpmback/xenbus-back.ts';
import type { Domain } from '../drivers/xen/domain.ts';

/** Retry delays after a warm start failed (a broken install must not spin). */
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 60_000;
const WAITING_NICE = 10;
/** The xenstore uuid of a waiting process's state back end (set to its instance's when taken). */
const WARM_UUID = '00000000-0000-0000-0000-000000000000';

function setPriority(pid: number, nice: number): void {
  try {
    osSetPriority(pid, nice);
  } catch {
    // it exited meanwhile: take() and the exit handler deal with that
  }
}

/** A waiting vtpmd and the manager's back end of its (connected) state link. */
export interface WarmVtpmd {
  daemon: StartedDaemon;
  stateBack: XenbusBack;
  stateLink: BackLink;
}

interface Waiting {
  warm: WarmVtpmd;
  log: string;
}

export class WarmPool {
  private readonly waiting: Waiting[] = [];
  private starting = 0;
  private seq = 0;
  private retryMs = RETRY_MIN_MS;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** The process whose state link is being connected now (at most one: fill() starts one at a time). */
  private connecting: { daemon: StartedDaemon; back?: XenbusBack } | undefined;
  private readonly dir: string;

  /** `domain`: the manager's domain now (it changes when the authority is replaced). */
  constructor(private readonly o: { runDir: string; size: number; log: (line: string) => void; domain: () => Domain }) {
    this.dir = join(o.runDir, 'warm');
  }

  get size(): number {
    return this.o.size;
  }

  /** The processes waiting now. */
  get pids(): number[] {
    return this.waiting.map((w) => w.warm.daemon.pid);
  }

  /** A waiting vtpmd (its stdin open, ready for "NAME TPM UUID FRONT"), or none (pool
   *  empty: the caller starts one cold). The caller owns its state back end from now on, and
   *  refills (fill()) once its start is done: a replacement starting meanwhile would take a
   *  core from the start it serves. */
  take(): WarmVtpmd | undefined {
    let got: Waiting | undefined;
    while ((got = this.waiting.shift()) && !alive(got.warm.daemon.pid)) this.discard(got);
    if (!got) return undefined;
    // From here on it logs to its instance's log (it moves its stdout/stderr there), and it
    // serves a guest: back to normal priority.
    rmSync(got.log, { force: true });
    setPriority(got.warm.daemon.pid, 0);
    return got.warm;
  }

  private discard(w: Waiting): void {
    rmSync(w.log, { force: true });
    void w.warm.stateBack.close().catch(() => undefined);
  }

  /** The state link of a vtpmd that has just reported ready: the manager's back end, then its
   *  domid on the vtpmd's stdin; resolves once the link is connected. */
  private async connect(daemon: StartedDaemon): Promise<WarmVtpmd> {
    if (this.closed) throw new VtpmError('ECLOSED', 'the warm pool was closed');
    const c: { daemon: StartedDaemon; back?: XenbusBack } = { daemon };
    this.connecting = c;
    try {
      const domain = this.o.domain();
      const stateBack = (c.back = await XenbusBack.start(domain, { frontId: Number(daemon.info.domid), uuid: WARM_UUID }));
      try {
        daemon.stdin!.write(`${domain.domid}\n`);
        return { daemon, stateBack, stateLink: await stateBack.connected(START_TIMEOUT_MS) };
      } catch (e) {
        await stateBack.close().catch(() => undefined);
        throw e;
      }
    } finally {
      if (this.connecting === c) this.connecting = undefined;
    }
  }

  /** Start processes up to the pool's size, one at a time (a start takes a core for
   *  ~150 ms; starting several at once would slow the guests' own start). */
  fill(): void {
    if (this.closed || this.retryTimer || this.starting > 0 || this.waiting.length >= this.o.size) return;
    this.starting++;
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const log = join(this.dir, `vtpmd-${++this.seq}.log`);
    startDaemon(builtScript('vtpmd/main'), ['--dir', this.o.runDir, '--warm'], { log, timeoutMs: START_TIMEOUT_MS, stdin: true }).then(
      (daemon) =>
        this.connect(daemon).catch(async (e: Error) => {
          await stopProcess(daemon.pid);
          throw e;
        }),
    ).then(
      (warm) => {
        this.starting--;
        this.retryMs = RETRY_MIN_MS;
        const w = { warm, log };
        if (this.closed) {
          this.discard(w);
          return void stopProcess(warm.daemon.pid);
        }
        // While it only waits, it yields to the running guests (its own start too).
        setPriority(warm.daemon.pid, WAITING_NICE);
        this.waiting.push(w);
        // One that dies while it waits (killed by hand, its authority gone) leaves the pool.
        void warm.daemon.exited.then(() => {
          const i = this.waiting.indexOf(w);
          if (i < 0) return;
          this.waiting.splice(i, 1);
          this.discard(w);
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
    // One still connecting its state link goes too (its handshake would wait for a manager
    // that is leaving); one still starting sees `closed` once it is up, or its stdin close.
    const c = this.connecting;
    await Promise.all([
      this.drain(),
      c && stopProcess(c.daemon.pid).then(() => c.back?.close().catch(() => undefined)),
    ]);
  }

  private async drain(): Promise<void> {
    const all = this.waiting.splice(0);
    await Promise.all(all.map(async (w) => {
      await stopProcess(w.warm.daemon.pid);
      this.discard(w);
    }));
  }
}
