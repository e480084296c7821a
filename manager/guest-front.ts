// A run's guest front end, whichever serves it: the host's front-end process (raw FUSE, one
// process for every guest: front-host.ts) or a process of the guest's own (fuse-native,
// drivers/tpmfront/front.ts). launch.ts drives either the same way: the front joins (its
// domid goes to vtpmd), connects to vtpmd's domid once vtpmd serves, and is stopped first.
import { join } from 'node:path';
import { isVtpmError } from '../drivers/base/errors.ts';
import { builtScript } from '../drivers/base/modules.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon, START_TIMEOUT_MS } from '../drivers/host/daemon.ts';
import type { FrontEnd } from '../drivers/tpmfront/mount.ts';
import type { FrontendHost } from './front-host.ts';
import { FRONTD_LOG } from './leftovers.ts';


export interface GuestFront {
  readonly domid: number;
  /** The process serving the node (shared by every guest of frontd). */
  readonly pid: number;
  /** Its own process (recorded with the run, stopped with it): not frontd. */
  readonly owned: boolean;
  /** Handshake with vtpmd's domain; resolves once the node is mounted (frontd) or the
   *  front was told (its own process, which then mounts by itself). */
  connect(backendId: number): Promise<void>;
  /** Why it no longer serves, when it does not. */
  dead(): string | undefined;
  /** Resolves when it stops serving by itself: how. */
  readonly died: Promise<string>;
  stop(): Promise<void>;
}

/** The guest's front end for a run of `name`: attached to frontd (raw), or its own process. */
export async function startGuestFront(kind: FrontEnd, o: { runDir: string; name: string; frontd: FrontendHost; lastLog: (log: string) => string }): Promise<GuestFront> {
  return kind === 'raw' ? attachShared(o.frontd, o.runDir, o.name) : startOwn(kind, o.runDir, o.name, o.lastLog);
}

async function attachShared(host: FrontendHost, runDir: string, name: string): Promise<GuestFront> {
  const fd = await host.ready();
  // One a previous run of this guest left (its manager crashed, or its frontd handshake
  // failed): gone first, since frontd attaches a name once.
  await fd.client.detach(name).catch((e) => {
    if (!(isVtpmError(e) && e.code === 'ENOENT')) throw e;
  });
  const domid = await fd.client.attach(name);
  let trouble: string | undefined;
  let signal: (why: string) => void = () => {};
  const died = new Promise<string>((resolve) => (signal = resolve));
  const off = host.onTrouble(name, (g) => {
    trouble = `its node stopped serving (${g.state}${g.why ? `: ${g.why}` : ''})`;
    // Disconnected: its vtpmd went away, whose own exit (seen a moment later) is the cause
    // to report; the front's only if vtpmd is still there by then.
    if (g.state === 'disconnected') setTimeout(() => signal(`tpmfront ${trouble}`), 1000).unref();
    else signal(`tpmfront ${trouble}`);
  });
  void fd.gone.then((why) => {
    trouble ??= `the front-end process ${why}`;
    signal(`tpmfront: the front-end process ${why}`);
  });
  let stopped = false;
  return {
    domid,
    pid: fd.pid,
    owned: false,
    async connect(backendId) {
      await fd.client.connect(name, backendId, START_TIMEOUT_MS);
    },
    dead: () => (trouble ? `tpmfront for ${name}: ${trouble} (see ${join(runDir, FRONTD_LOG)})` : undefined),
    died,
    async stop() {
      if (stopped) return;
      stopped = true;
      off();
      if (!trouble || !/front-end process/.test(trouble)) {
        await fd.client.detach(name).catch((e) => {
          if (!(isVtpmError(e) && (e.code === 'ENOENT' || e.code === 'ECLOSED'))) throw e;
        });
      }
    },
  };
}

async function startOwn(kind: FrontEnd, runDir: string, name: string, lastLog: (log: string) => string): Promise<GuestFront> {
  const log = join(runDir, name, 'front.log');
  const d: StartedDaemon = await startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', runDir, '--name', name, '--fuse', kind], { log, timeoutMs: START_TIMEOUT_MS, stdin: true });
  return {
    domid: Number(d.info.domid),
    pid: d.pid,
    owned: true,
    async connect(backendId) {
      d.stdin!.end(`${backendId}\n`);
    },
    dead: () => (alive(d.pid) ? undefined : `tpmfront for ${name} exited: ${lastLog(log)}`),
    died: d.exited.then((e) => `tpmfront exited (${e.signal ?? `code ${e.code}`})`),
    stop: async () => void (await stopProcess(d.pid)),
  };
}
