// Test helper: spawn a domain process (child.ts) and call it over IPC.
import { fork, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import fs from 'node:fs';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { startAuthority, type AuthorityProcess } from '../../drivers/xen/authority-launch.ts';

const here = path.dirname(fileURLToPath(import.meta.url));

export class CallError extends Error {
  constructor(readonly code: string, msg: string) {
    super(`${code}: ${msg}`);
  }
}

export class Agent {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: any) => void; reject: (e: Error) => void }>();
  readonly events: any[] = [];
  private evWaiters: { pred: (e: any) => boolean; resolve: (e: any) => void }[] = [];
  exited: Promise<void>;
  private constructor(readonly proc: ChildProcess) {
    this.exited = new Promise((r) => proc.once('exit', () => r()));
    proc.on('message', (m: any) => {
      if (m.id !== undefined) {
        const p = this.pending.get(m.id)!;
        this.pending.delete(m.id);
        if (m.ok) p.resolve(m.result);
        else p.reject(new CallError(m.err, m.msg));
      } else {
        this.events.push(m);
        this.evWaiters = this.evWaiters.filter((w) => (w.pred(m) ? (w.resolve(m), false) : true));
      }
    });
    proc.once('exit', () => {
      for (const p of this.pending.values()) p.reject(new CallError('EXITED', 'child exited'));
      this.pending.clear();
    });
  }
  static async spawn(): Promise<Agent> {
    const proc = fork(path.join(here, 'child.ts'), [], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const a = new Agent(proc);
    await a.event((e) => e.ev === 'ready', 20_000);
    return a;
  }
  get pid(): number {
    return this.proc.pid!;
  }
  call(op: string, args: Record<string, unknown> = {}): Promise<any> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.proc.send({ id, op, args });
    });
  }
  /** Resolves with the error code of a failing call ('ok' if it succeeded). */
  async code(op: string, args: Record<string, unknown> = {}): Promise<string> {
    try {
      await this.call(op, args);
      return 'ok';
    } catch (e) {
      return (e as CallError).code;
    }
  }
  event(pred: (e: any) => boolean, timeoutMs = 10_000): Promise<any> {
    const found = this.events.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('event timeout')), timeoutMs);
      this.evWaiters.push({ pred, resolve: (e) => (clearTimeout(t), resolve(e)) });
    });
  }
  kill(sig: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(sig);
    return this.exited;
  }
}

/** A fresh runtime dir with a running authority; cleans up after. */
export async function withAuthority(): Promise<{ dir: string; auth: AuthorityProcess; done: () => Promise<void> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-xen-'));
  const auth = await startAuthority(dir);
  return {
    dir,
    auth,
    async done() {
      await auth.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
