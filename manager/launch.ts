// One run of an instance: a guest front end (the tpm0 node), a vtpmd, and the manager's
// back end of the vtpmd's state link, served by the host's state thread (state-worker.ts). The
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
// joined already and its state link is connected; it learns its instance and the front's
// domid on stdin, and only then is the link handed to the state thread for that instance. The host's one state
// thread serves every instance's link (started with the first run, off the start's path).
// TPM 2.0 boots without a full self test (vtpmd/engine-core.ts says why).
import { hkdfSync } from 'node:crypto';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { decode, encode } from 'cbor-x';
import { processAlive, procStartTime } from '../drivers/base/libc.ts';
import { readBounded, writeFileAtomic } from '../drivers/host/state-dir.ts';
import { join } from 'node:path';
import { VtpmError } from '../drivers/base/errors.ts';
import { accepting } from '../drivers/base/rpc.ts';
import { stopProcess, START_TIMEOUT_MS } from '../drivers/host/daemon.ts';
import type { WarmVtpmd } from './warm-pool.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { XenbusBack } from '../drivers/tpmback/xenbus-back.ts';
import { detach } from '../drivers/tpmfront/mountpoint.ts';
import { waitNodeAnswers } from '../drivers/tpmfront/probe.ts';
import type { Domain } from '../drivers/xen/domain.ts';
import type { FrontEnd } from '../drivers/tpmfront/mount.ts';
import { StateThread, type StateLink } from './state-thread.ts';
import type { InstanceRecord } from './store/table.ts';
import { measureLaunch } from './attest/service.ts';
import type { FrontendHost } from './front-host.ts';
import { startGuestFront, type GuestFront } from './guest-front.ts';
import type { GroupHost } from './group-host.ts';
import { startVtpmd, type VtpmdRun } from './vtpmd-run.ts';


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
  warm?: () => WarmVtpmd | undefined;
  /** The host's front-end process (raw tpm0 guests are attached to it). */
  frontd: FrontendHost;
  /** The host's grouped vtpmd processes (instances created with --group). */
  groups: GroupHost;
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
  let front: GuestFront | undefined;
  let vtpmdStarted: VtpmdRun | undefined;
  let back: XenbusBack | undefined;
  const ctrlPath = join(gdir, 'swtpm-ctrl.sock');
  // The host's state thread (started with the first run of this domain) while the processes start.
  const stateThread = StateThread.for(o.domain, o.log);
  let served: StateLink | undefined;
  try {
    // The front end and vtpmd start side by side: vtpmd learns the front's domid on stdin,
    // with the manager's.
    const frontP = qemu ? Promise.resolve(undefined) : startGuestFront(fuse, { runDir: o.runDir, name: rec.name, frontd: o.frontd, lastLog: lastLogLine });
    const warm = qemu || typeof rec.meta.group === 'string' ? undefined : o.warm?.();
    if (warm) back = warm.stateBack; // ours from now on: closed with the run, or on a failure
    // Measured launch: the hardware PCR records the code and config before vtpmd runs (a
    // warm vtpmd: before it is told which instance it is).
    const vtpmdP = measureLaunch(o.runDir, { name: rec.name, uuid: rec.uuid, tpm: rec.tpm, guest: fuse }).then(
      () => startVtpmd(rec, { runDir: o.runDir, groups: o.groups, lastLog: lastLogLine, ...(qemu ? { qemuCtrl: ctrlPath } : {}), ...(warm ? { warm } : {}) }),
      (e) => {
        if (warm) void stopProcess(warm.daemon.pid);
        throw e;
      },
    );
    const [fr, vt] = await Promise.allSettled([frontP, vtpmdP]);
    if (fr.status === 'fulfilled') front = fr.value;
    if (vt.status === 'fulfilled') vtpmdStarted = vt.value;
    if (fr.status === 'rejected') throw fr.reason;
    if (vt.status === 'rejected') throw vt.reason;
    const vtpmd = vt.value;
    recordPieces(gdir, [...(front?.owned ? [front.pid] : []), ...(vtpmd.owned ? [vtpmd.pid] : [])], fuse);
    const vtpmdDomid = vtpmd.domid;
    // A warm vtpmd's state link is connected already (its back end served nothing so far).
    back ??= await XenbusBack.start(o.domain, { frontId: vtpmdDomid, uuid: rec.uuid });
    const linked = warm ? Promise.resolve(warm.stateLink) : back.connected(START_TIMEOUT_MS);
    if (warm) void warm.stateBack.setUuid(rec.uuid).catch((e) => o.log(`instance ${rec.name}: naming its state back end: ${(e as Error).message}`));
    // Not awaited yet: a group member's link resolves once its TPM is up, from the state
    // the link below serves.
    const linking = vtpmd.link(o.domain.domid, qemu ? qemuExportKey(rec).toString('hex') : String(front!.domid), front?.domid);
    linking.catch(() => undefined);
    const link = await linked;
    let last = rec.blobs;
    const state = (served = (await stateThread).serve(
      { params: link.params, stateDir: o.stateDir, uuid: rec.uuid, name: rec.name, key: rec.key, minVersions: rec.blobs },
      (v) => o.onVersions((last = v)),
      (why) => o.log(`instance ${rec.name}: state link ended (${why})`),
    ));
    const ended = state.ended.then((v) => (o.onVersions((last = v)), v));
    const b = back;
    b.onDisconnect(() => state.stop());
    await linking;
    const node = qemu ? ctrlPath : join(gdir, 'dev', 'tpm0');
    const dead = () => vtpmd.dead() ?? front?.dead();
    await (async () => {
      await front?.connect(vtpmdDomid);
      await (qemu ? waitListening(ctrlPath, START_TIMEOUT_MS, dead) : waitNodeAnswers(node, rec.tpm as TpmVersion, START_TIMEOUT_MS, dead));
    })().catch(async (e) => {
      state.stop();
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
        state.stop();
        throw new VtpmError('ETIMEDOUT', `the state link of ${rec.name} did not end within 5 s`);
      }
      return versions;
    };
    return {
      name: rec.name,
      node,
      fuse,
      ...(front ? { front: { pid: front.pid, domid: front.domid } } : {}),
      vtpmd: { pid: vtpmd.pid, domid: vtpmdDomid },
      started: new Date().toISOString(),
      died: Promise.race([...(front ? [front.died] : []), vtpmd.died]),
      stop: () =>
        (stopping ??= (async () => {
          await front?.stop();
          await vtpmd.stop().catch((e) => o.log(`instance ${rec.name}: stopping its vtpmd: ${(e as Error).message}`));
          return finish();
        })()),
      suspend: () => {
        if (stopping) return Promise.reject(new VtpmError('EBUSY', `instance ${rec.name} is already stopping`));
        return (stopping = (async () => {
          await front?.stop();
          const before = last.volatilestate ?? -1;
          let failed: unknown;
          await vtpmd.suspend().catch((e) => (failed = e));
          const versions = await finish();
          if (!failed && (versions.volatilestate ?? -1) > before) return versions;
          const why = failed ?? new VtpmError('ESTATE', `vtpmd for ${rec.name} stored no volatile state`);
          throw Object.assign(why instanceof VtpmError ? why : new VtpmError('ESTATE', String(why)), { versions });
        })());
      },
    };
  } catch (e) {
    served?.stop();
    // A piece that died first is the reason (what it logged), whatever failed after it.
    const frontDead = front?.dead();
    const vtpmdDead = vtpmdStarted?.dead();
    await front?.stop().catch((x) => o.log(`instance ${rec.name}: stopping its front end: ${(x as Error).message}`));
    await vtpmdStarted?.stop().catch(() => undefined);
    await back?.close().catch(() => undefined);
    await clearLeftovers(gdir);
    const already = e instanceof VtpmError && /exited: |stopped serving|front-end process/.test(e.message);
    if (!already && vtpmdDead) throw new VtpmError('EIO', vtpmdDead, { cause: e });
    if (!already && frontDead) throw new VtpmError('EIO', frontDead, { cause: e });
    throw e;
  }
}
