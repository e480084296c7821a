// One run of an instance: a guest front end (the tpm0 node), a vtpmd, and the manager's
// back end of the vtpmd's state link with its serving thread (state-worker.ts). The
// supervisor (supervisor.ts) starts, stops and restarts runs.
//
// Start order (each piece waits for the one before, as Xen's toolstack wires a vTPM):
// the guest's tpmfront joins (its domid is vtpmd's peer); vtpmd joins and reports its
// domid; the manager opens the state back end for that domid and hands vtpmd its own
// domid on stdin; vtpmd connects, boots the TPM from the state the manager serves, and
// publishes the guest back end; tpmfront learns vtpmd's domid and connects; the node is
// handed out once a GetRandom through it answers. Stop: front end, then vtpmd (an orderly
// TPM shutdown whose last stores still reach the manager), then the state link.
// A tpm0 guest's vtpmd comes from the warm pool when one waits there (warm-pool.ts): it has
// joined already, and learns its instance with the domids on stdin. The state link's
// thread starts first of all and gets its link once connected (its load is not on the path).
// TPM 2.0 boots without a full self test (engine-worker.ts says why).
import { hkdfSync } from 'node:crypto';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { decode, encode } from 'cbor-x';
import { processAlive, procStartTime } from '../drivers/base/libc.ts';
import { readBounded, writeFileAtomic } from '../drivers/host/state-dir.ts';
import { join } from 'node:path';
import { VtpmError } from '../drivers/base/errors.ts';
import { builtScript, sibling, startWorker } from '../drivers/base/modules.ts';
import { accepting } from '../drivers/base/rpc.ts';
import { alive, startDaemon, stopProcess, type StartedDaemon } from '../drivers/host/daemon.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { XenbusBack } from '../drivers/tpmback/xenbus-back.ts';
import { TpmifBack } from '../drivers/tpmback/tpmif-back.ts';
import { detach } from '../drivers/tpmfront/mountpoint.ts';
import { waitNodeAnswers } from '../drivers/tpmfront/probe.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { FrontEnd } from '../drivers/tpmfront/mount.ts';
import type { StateWorkerData, StateWorkerEvent } from './state-worker.ts';
import { EXIT_OK, SUSPEND_FAILED } from '../vtpmd/exit-codes.ts';
import type { InstanceRecord } from './store/table.ts';
import { measureLaunch } from './attest/service.ts';

const START_TIMEOUT_MS = 30_000;

export interface RunPieces {
  name: string;
  node: string;
  /** The guest's kind: a tpm0 node served by the raw (FUSE protocol in a worker) or native
   *  (fuse-native) front end, or a QEMU VM's swtpm control socket. */
  fuse: GuestKind;
  vtpmd: { pid: number; domid: number };
  /** The tpm0 node's front end (none for a QEMU guest). */
  front?: { pid: number; domid: number };
  started: string;
}

export interface Run extends RunPieces {
  /** Resolves when the front end or vtpmd exits (by itself or by stop()): which, and how. */
  died: Promise<string>;
  /** Stop every piece; resolves with the blob versions the state link last committed. */
  stop(): Promise<Record<string, number>>;
  /** Suspend: the front end stops, vtpmd hands the running TPM's volatile state to the
   *  manager and exits without a TPM shutdown. Resolves with the committed versions (they
   *  include 'volatilestate'); rejects (the run stopped orderly instead) when it could not. */
  suspend(): Promise<Record<string, number>>;
}

export interface LaunchOptions {
  runDir: string;
  stateDir: string;
  domain: Domain;
  log: (line: string) => void;
  onVersions: (v: Record<string, number>) => void;
  /** The guest's kind (default raw). */
  fuse?: GuestKind;
  /** A waiting vtpmd from the warm pool, if one is there (tpm0 guests). */
  warm?: () => StartedDaemon | undefined;
}

/** How the guest reaches its TPM: a tpm0 node (FUSE front end) or QEMU's control socket. */
export type GuestKind = FrontEnd | 'qemu';

/** A QEMU guest's control socket takes connections (vtpmd listens once its TPM is ready). */
async function waitListening(path: string, timeoutMs: number, dead: () => string | undefined): Promise<void> {
  for (const end = Date.now() + timeoutMs; ; ) {
    if (await accepting(path)) return;
    const why = dead();
    if (why) throw new VtpmError('EIO', why);
    if (Date.now() > end) throw new VtpmError('ETIMEDOUT', `${path} did not take connections within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const how = (what: string, e: { code: number | null; signal: NodeJS.Signals | null }) => `${what} exited (${e.signal ?? `code ${e.code}`})`;

const PIECES = 'pieces.cbor';

/** What a piece that died said last (its own error report, with causes), for the caller's
 *  one-line reason; the log's path when it said nothing. */
function lastLogLine(log: string): string {
  const tail = (readBounded(log, 64 << 20, 'a log') ?? Buffer.alloc(0)).subarray(-4096).toString('utf8').trimEnd().split('\n').pop() ?? '';
  const line = tail.replace(/^\S+ (vtpmd|tpmfront): /, '').slice(0, 600);
  return line ? `${line} (${log})` : `see ${log}`;
}

/** A run of `name` left behind (its manager died while it ran): its front end's kind. */
export function leftBehind(runDir: string, name: string): { fuse: GuestKind } | undefined {
  const file = join(runDir, name, PIECES);
  if (!existsSync(file)) return undefined;
  let fuse: unknown;
  try {
    fuse = (decode(readBounded(file, 4096, 'the record of a previous run') ?? new Uint8Array()) as { fuse?: unknown })?.fuse;
  } catch {
    // unreadable: relaunched with the default front end
  }
  return { fuse: fuse === 'native' || fuse === 'qemu' ? fuse : 'raw' };
}

/** Stop what a previous run left behind: a manager killed with its instances running
 *  leaves their vtpmd and front end serving nobody (recorded with their start times, so a
 *  reused pid is never signalled), and a dead front end leaves its mount. */
async function clearLeftovers(gdir: string): Promise<void> {
  const bytes = readBounded(join(gdir, PIECES), 4096, 'the record of a previous run');
  if (bytes) {
    const rec = decode(bytes) as { v?: unknown; pids?: unknown };
    const pids = rec?.v === 1 && Array.isArray(rec.pids) ? (rec.pids as { pid: number; start: number }[]) : [];
    for (const p of pids) if (Number.isInteger(p?.pid) && processAlive(p.pid, p.start)) await stopProcess(p.pid);
    rmSync(join(gdir, PIECES), { force: true });
  }
  detach(join(gdir, 'dev'));
}

function recordPieces(gdir: string, pids: number[], fuse: GuestKind): void {
  writeFileAtomic(join(gdir, PIECES), encode({ v: 1, pids: pids.map((pid) => ({ pid, start: procStartTime(pid) })), fuse }));
}

/** The key vtpmd seals the state blobs QEMU exports with: this instance's, from its own key. */
export function qemuExportKey(rec: InstanceRecord): Buffer {
  return Buffer.from(hkdfSync('sha256', rec.key, Buffer.from(rec.uuid), 'vtpm-qemu-stateblob-export', 32));
}

/** Start one run of `rec`; resolves once its node answers (a QEMU guest: once its control
 *  socket takes connections, with the TPM waiting for QEMU's INIT). */
export async function launch(rec: InstanceRecord, o: LaunchOptions): Promise<Run> {
  const gdir = join(o.runDir, rec.name);
  const fuse = o.fuse ?? 'raw';
  const qemu = fuse === 'qemu';
  mkdirSync(join(gdir, 'dev'), { recursive: true, mode: 0o700 });
  await clearLeftovers(gdir);
  const started: StartedDaemon[] = [];
  let vtpmdStarted: StartedDaemon | undefined;
  let back: XenbusBack | undefined;
  const ctrlPath = join(gdir, 'swtpm-ctrl.sock');
  // The state link's thread loads while the processes start; it gets its link later.
  const worker = startWorker(sibling(import.meta.url, './state-worker'), {});
  let serving = false;
  try {
    // The front end and vtpmd start side by side (each is a Node process): vtpmd learns the
    // front's domid on stdin, with the manager's.
    const frontP = qemu
      ? Promise.resolve(undefined)
      : startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', o.runDir, '--name', rec.name, '--fuse', fuse], {
          log: join(gdir, 'front.log'),
          timeoutMs: START_TIMEOUT_MS,
          stdin: true,
        });
    const guestArgs = qemu ? ['--qemu', ctrlPath] : [];
    const warm = qemu ? undefined : o.warm?.();
    // Measured launch: the hardware PCR records the code and config before vtpmd runs (a
    // warm vtpmd: before it is told which instance it is).
    const vtpmdP = measureLaunch(o.runDir, { name: rec.name, uuid: rec.uuid, tpm: rec.tpm, guest: fuse }).then(
      () =>
        warm ??
        startDaemon(builtScript('vtpmd/main'), ['--dir', o.runDir, '--name', rec.name, '--tpm', rec.tpm, ...guestArgs, '--uuid', rec.uuid, '--state-link'], {
          log: join(gdir, 'vtpmd.log'),
          timeoutMs: START_TIMEOUT_MS,
          stdin: true,
        }),
      (e) => {
        if (warm) void stopProcess(warm.pid);
        throw e;
      },
    );
    const [fr, vt] = await Promise.allSettled([frontP, vtpmdP]);
    if (fr.status === 'fulfilled' && fr.value) started.push(fr.value);
    if (vt.status === 'fulfilled') started.push((vtpmdStarted = vt.value));
    if (fr.status === 'rejected') throw fr.reason;
    if (vt.status === 'rejected') throw vt.reason;
    const front = fr.value;
    const vtpmd = vt.value;
    recordPieces(gdir, started.map((d) => d.pid), fuse);
    const vtpmdDomid = Number(vtpmd.info.domid);
    back = await XenbusBack.start(o.domain, { frontId: vtpmdDomid, uuid: rec.uuid });
    const linked = back.connected(START_TIMEOUT_MS);
    // The export key goes over stdin: never on a command line (world-readable in /proc).
    const managerLine = `${o.domain.domid} ${qemu ? qemuExportKey(rec).toString('hex') : front!.info.domid}`;
    vtpmd.stdin!.end(`${warm ? `${rec.name} ${rec.tpm} ${rec.uuid} ` : ''}${managerLine}\n`);
    const link = await linked;
    worker.postMessage({ params: link.params, stateDir: o.stateDir, uuid: rec.uuid, name: rec.name, key: rec.key, minVersions: rec.blobs } satisfies StateWorkerData);
    serving = true;
    let last = rec.blobs;
    const ended = new Promise<Record<string, number>>((resolve) => {
      worker.on('message', (m: StateWorkerEvent) => {
        last = m.versions;
        o.onVersions(m.versions);
        if (m.ev === 'ended') o.log(`instance ${rec.name}: state link ended (${m.why})`);
      });
      worker.once('error', (e) => o.log(`instance ${rec.name}: state thread crashed: ${e.message}`));
      worker.once('exit', () => resolve(last));
    });
    const b = back;
    b.onDisconnect(() => TpmifBack.stopFrom(link.params));
    front?.stdin!.end(`${vtpmdDomid}\n`);
    const node = qemu ? ctrlPath : join(gdir, 'dev', 'tpm0');
    const dead = () => {
      if (front && !alive(front.pid)) return `tpmfront for ${rec.name} exited: ${lastLogLine(join(gdir, 'front.log'))}`;
      if (!alive(vtpmd.pid)) return `vtpmd for ${rec.name} exited: ${lastLogLine(join(gdir, 'vtpmd.log'))}`;
      return undefined;
    };
    await (qemu ? waitListening(ctrlPath, START_TIMEOUT_MS, dead) : waitNodeAnswers(node, rec.tpm as TpmVersion, START_TIMEOUT_MS, dead)).catch(async (e) => {
      TpmifBack.stopFrom(link.params);
      await ended;
      throw e;
    });
    let stopping: Promise<Record<string, number>> | null = null;
    /** After vtpmd is gone: the leftovers and the state link, then the committed versions. */
    const finish = async (): Promise<Record<string, number>> => {
      await clearLeftovers(gdir);
      await b.close().catch((e) => o.log(`instance ${rec.name}: closing the state link: ${(e as Error).message}`));
      const versions = await Promise.race([ended, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5000).unref())]);
      if (!versions) {
        await worker.terminate();
        throw new VtpmError('ETIMEDOUT', `the state link of ${rec.name} did not end within 5 s`);
      }
      return versions;
    };
    return {
      name: rec.name,
      node,
      fuse,
      ...(front ? { front: { pid: front.pid, domid: Number(front.info.domid) } } : {}),
      vtpmd: { pid: vtpmd.pid, domid: vtpmdDomid },
      started: new Date().toISOString(),
      died: Promise.race([...(front ? [front.exited.then((e) => how('tpmfront', e))] : []), vtpmd.exited.then((e) => how('vtpmd', e))]),
      stop: () =>
        (stopping ??= (async () => {
          if (front) await stopProcess(front.pid);
          await stopProcess(vtpmd.pid, 15_000); // its orderly shutdown still stores through the link
          return finish();
        })()),
      suspend: () => {
        if (stopping) return Promise.reject(new VtpmError('EBUSY', `instance ${rec.name} is already stopping`));
        return (stopping = (async () => {
          if (front) await stopProcess(front.pid);
          const before = last.volatilestate ?? -1;
          const exit = vtpmd.exited;
          if (alive(vtpmd.pid)) process.kill(vtpmd.pid, 'SIGUSR1');
          const how = await Promise.race([exit, new Promise<undefined>((res) => setTimeout(() => res(undefined), 15_000).unref())]);
          if (!how) await stopProcess(vtpmd.pid);
          const versions = await finish();
          if (how?.code === EXIT_OK && (versions.volatilestate ?? -1) > before) return versions;
          const said = lastLogLine(join(gdir, 'vtpmd.log'));
          const what = !how ? 'did not suspend within 15 s (stopped)' : how.code === SUSPEND_FAILED ? 'could not store its state and stopped orderly instead' : `exited (${how.signal ?? `code ${how.code}`})`;
          throw Object.assign(new VtpmError('ESTATE', `vtpmd for ${rec.name} ${what}: ${said}`), { versions });
        })());
      },
    };
  } catch (e) {
    if (!serving) await worker.terminate();
    // A piece that died first is the reason (what it logged), whatever failed after it.
    const dead = started.find((d) => !alive(d.pid));
    for (const d of [...started].reverse()) await stopProcess(d.pid);
    await back?.close().catch(() => undefined);
    await clearLeftovers(gdir);
    if (dead && !(e instanceof VtpmError && /exited: /.test(e.message))) {
      const what = dead === vtpmdStarted ? 'vtpmd' : 'tpmfront';
      throw new VtpmError('EIO', `${what} for ${rec.name} exited: ${lastLogLine(join(gdir, `${what === 'vtpmd' ? 'vtpmd' : 'front'}.log`))}`, { cause: e });
    }
    throw e;
  }
}
