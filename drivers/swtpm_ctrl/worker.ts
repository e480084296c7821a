// The server's thread: builds the engine (libtpms), its store and the owner's hooks, then
// serves the control socket and data channel with blocking syscalls until SHUTDOWN, the
// owner's stop, or a hang-up. Started by thread.ts.
import { parentPort, workerData } from 'node:worker_threads';
import { pathToFileURL } from 'node:url';
import { describeError, errorToWire, type WireError } from '../base/errors.ts';
import { DirStateStore } from '../host/state-dir.ts';
import { LibtpmsEngine } from '../libtpms/libtpms-engine.ts';
import { bootTpm } from '../tpm/boot.ts';
import { MemoryStateStore, type StateStore, type TpmVersion } from '../tpm/engine.ts';
import { Controller, type CtrlHooks } from './controller.ts';
import { libtpmsPlatform } from './platform.ts';
import { CtrlServer, type DataEndpoint, type ServeEnd } from './server.ts';

/** A module exporting `(params, ctx) => CtrlHooks`, loaded inside the server thread (hooks
 *  are functions: they cannot cross a thread boundary themselves). */
export interface HooksSpec {
  module: string;
  export: string;
  params?: unknown;
}
export type HooksFactory = (params: unknown, ctx: { version: TpmVersion; store: StateStore }) => CtrlHooks | Promise<CtrlHooks>;

export interface CtrlWorkerData {
  version: TpmVersion;
  /** Plain blob files here; in memory when absent. */
  stateDir?: string;
  ctrlPath: string;
  data?: DataEndpoint;
  /** The read end of the owner's stop pipe (same process, so the number is valid here). */
  stopFd: number;
  /** swtpm --flags not-need-init: the TPM is powered on at start, before any INIT. */
  notNeedInit?: boolean;
  /** swtpm --flags startup-clear: Startup(CLEAR) after power-on (at start and every INIT). */
  startupClear?: boolean;
  terminateOnHup?: boolean;
  hooks?: HooksSpec;
  /** Log control-channel diagnostics to stderr. */
  verbose?: boolean;
}

export type CtrlWorkerEvent = { ev: 'ready' } | { ev: 'ended'; why: ServeEnd } | ({ ev: 'error' } & WireError);

const d = workerData as CtrlWorkerData;
const port = parentPort!;
const log = (msg: string) => {
  if (d.verbose) process.stderr.write(`${new Date().toISOString()} swtpm-ctrl: ${msg}\n`);
};

async function main(): Promise<void> {
  const store: StateStore = d.stateDir ? new DirStateStore(d.stateDir) : new MemoryStateStore();
  let hooks: CtrlHooks = {};
  if (d.hooks) {
    const mod = (await import(pathToFileURL(d.hooks.module).href)) as Record<string, unknown>;
    const factory = mod[d.hooks.export] as HooksFactory | undefined;
    if (typeof factory !== 'function') throw new Error(`${d.hooks.module} has no export ${d.hooks.export}`);
    hooks = await factory(d.hooks.params, { version: d.version, store });
  }
  hooks = { log, ...hooks };
  const engine = new LibtpmsEngine({ version: d.version, store, deferStart: !d.notNeedInit });
  let server: CtrlServer | undefined;
  try {
    if (d.notNeedInit && d.startupClear) bootTpm(engine, { selfTest: false });
    const controller = new Controller({ engine, store, platform: libtpmsPlatform(engine), hooks, startupAfterInit: d.startupClear === true });
    server = new CtrlServer({ controller, ctrl: { listenPath: d.ctrlPath }, data: d.data, stopFd: d.stopFd, terminateOnHup: d.terminateOnHup, log });
    port.postMessage({ ev: 'ready' } satisfies CtrlWorkerEvent);
    const why = server.serveSync();
    // An owner's stop or a hang-up powers the TPM off the way STOP does (orderly).
    if (why !== 'shutdown') controller.stopTpm();
    port.postMessage({ ev: 'ended', why } satisfies CtrlWorkerEvent);
  } finally {
    server?.close();
    engine.terminate();
  }
}

main().catch((e) => {
  log(describeError(e));
  port.postMessage({ ev: 'error', ...errorToWire(e) } satisfies CtrlWorkerEvent);
});
