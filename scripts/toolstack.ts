// The toolstack (Xen's xl/libxl role) for one host dir: starts the authority, then for each
// guest its vtpmd and its tpmfront node, wires them together and records what runs.
//
// Layout under DIR (0700): authority.sock and mem/ (drivers/xen), and per guest DIR/NAME/
// with state/ (the vTPM's blobs), dev/tpm0 (the node), vtpmd.log, front.log, guest.cbor.
import { decode, encode } from 'cbor-x';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, chmodSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { alive, startDaemon, stopProcess } from '../drivers/host/daemon.ts';
import { builtScript, ensureBuilt } from '../drivers/base/modules.ts';
import { writeFileAtomic } from '../drivers/host/state-dir.ts';
import { detach } from '../drivers/tpmfront/mountpoint.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { VtpmError } from '../drivers/base/errors.ts';
import { authorityPid, ensureAuthority } from '../drivers/xen/authority-launch.ts';
import { waitNodeAnswers } from '../drivers/tpmfront/probe.ts';

const RECORD_VERSION = 1;
const NAME = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const RESERVED = new Set(['mem']);

export type FuseKind = 'raw' | 'native';

export interface GuestRecord {
  v: number;
  name: string;
  tpm: TpmVersion;
  fuse: FuseKind;
  node: string;
  vtpmd: { pid: number; domid: number };
  front: { pid: number; domid: number };
  started: string;
}

export interface GuestStatus extends GuestRecord {
  running: boolean;
}

function checkName(name: string): void {
  if (!NAME.test(name) || RESERVED.has(name)) {
    throw new VtpmError('EINVAL', `guest name ${JSON.stringify(name)}: use 1-32 of a-z 0-9 _ - (not ${[...RESERVED].join(', ')})`);
  }
}

/** Prepare DIR (0700), refusing a path that is not a directory we can use. */
export function prepareDir(dir: string): string {
  const d = resolve(dir);
  try {
    mkdirSync(d, { recursive: true, mode: 0o700 });
    if (!statSync(d).isDirectory()) throw new Error('not a directory');
    chmodSync(d, 0o700);
  } catch (e) {
    throw new VtpmError('EINVAL', `host dir ${d} is unusable: ${(e as Error).message}`, { cause: e });
  }
  return d;
}

function recordPath(dir: string, name: string): string {
  return join(dir, name, 'guest.cbor');
}

function writeRecord(dir: string, rec: GuestRecord): void {
  writeFileAtomic(recordPath(dir, rec.name), encode(rec));
}

export function readRecord(dir: string, name: string): GuestRecord | undefined {
  const f = recordPath(dir, name);
  if (!existsSync(f)) return undefined;
  const buf = readFileSync(f);
  if (buf.length > 64 * 1024) throw new VtpmError('EOVERSIZE', `guest record ${f} is ${buf.length} bytes`);
  const rec = decode(buf) as GuestRecord;
  if (rec?.v !== RECORD_VERSION || rec.name !== name) throw new VtpmError('EPROTO', `guest record ${f} is not a version ${RECORD_VERSION} record for ${name}`);
  return rec;
}

export function guestStatus(rec: GuestRecord): GuestStatus {
  return { ...rec, running: alive(rec.vtpmd.pid) && alive(rec.front.pid) };
}

export function listGuests(dir: string): GuestStatus[] {
  const d = resolve(dir);
  if (!existsSync(d)) return [];
  const out: GuestStatus[] = [];
  for (const name of readdirSync(d).sort()) {
    if (!NAME.test(name) || RESERVED.has(name)) continue;
    const rec = readRecord(d, name);
    if (rec) out.push(guestStatus(rec));
  }
  return out;
}

export interface StartOptions {
  dir: string;
  name: string;
  tpm: TpmVersion;
  fuse?: FuseKind;
  timeoutMs?: number;
}

/** Start a guest's vTPM: vtpmd + tpmfront node. Returns once the node answers a command. */
export async function startGuest(o: StartOptions): Promise<GuestRecord> {
  checkName(o.name);
  const dir = prepareDir(o.dir);
  const fuse = o.fuse ?? 'raw';
  const prev = readRecord(dir, o.name);
  if (prev && guestStatus(prev).running) throw new VtpmError('EBUSY', `guest ${o.name} is already running (node ${prev.node})`);
  if (prev) await stopGuest(dir, o.name); // a piece died: clear what is left, then start afresh
  if (prev && prev.tpm !== o.tpm) throw new VtpmError('EINVAL', `guest ${o.name} has a TPM ${prev.tpm}, not ${o.tpm}`);
  const gdir = join(dir, o.name);
  mkdirSync(join(gdir, 'dev'), { recursive: true, mode: 0o700 });
  await ensureBuilt(); // once per start: every daemon below runs build/*.js
  await ensureAuthority(dir, builtScript('drivers/xen/authority'));
  const timeoutMs = o.timeoutMs ?? 30_000;

  // The front joins first (its domid is the back end's peer); it learns the back end's
  // domid on stdin once vtpmd has published its InitWait.
  const front = await startDaemon(builtScript('drivers/tpmfront/front'), ['--dir', dir, '--name', o.name, '--fuse', fuse], {
    log: join(gdir, 'front.log'),
    timeoutMs,
    stdin: true,
  });
  const frontDomid = Number(front.info.domid);
  let vtpmd;
  try {
    vtpmd = await startDaemon(builtScript('vtpmd/main'), ['--dir', dir, '--name', o.name, '--tpm', o.tpm, '--front', String(frontDomid)], {
      log: join(gdir, 'vtpmd.log'),
      timeoutMs,
    });
  } catch (e) {
    await stopProcess(front.pid);
    throw e;
  }
  const rec: GuestRecord = {
    v: RECORD_VERSION,
    name: o.name,
    tpm: o.tpm,
    fuse,
    node: join(gdir, 'dev', 'tpm0'),
    vtpmd: { pid: vtpmd.pid, domid: Number(vtpmd.info.domid) },
    front: { pid: front.pid, domid: frontDomid },
    started: new Date().toISOString(),
  };
  writeRecord(dir, rec);
  try {
    front.stdin!.end(`${rec.vtpmd.domid}\n`);
    await waitNodeAnswers(rec.node, rec.tpm, timeoutMs, () => {
      if (!alive(rec.front.pid)) return `tpmfront for ${rec.name} exited (see ${join(gdir, 'front.log')})`;
      if (!alive(rec.vtpmd.pid)) return `vtpmd for ${rec.name} exited (see ${join(gdir, 'vtpmd.log')})`;
      return undefined;
    });
  } catch (e) {
    await stopGuest(dir, o.name);
    throw e;
  }
  return rec;
}

/** Stop a guest's pieces (front first: it unmounts the node), keep its state. */
export async function stopGuest(dir: string, name: string): Promise<{ front: string; vtpmd: string }> {
  checkName(name);
  const d = resolve(dir);
  const rec = readRecord(d, name);
  if (!rec) throw new VtpmError('ENOENT', `no guest ${name} in ${d}`);
  const front = await stopProcess(rec.front.pid);
  const vtpmd = await stopProcess(rec.vtpmd.pid);
  detach(join(d, name, 'dev')); // a killed front leaves a dead FUSE mount behind
  rmSync(recordPath(d, name), { force: true });
  return { front, vtpmd };
}

/** Stop every running guest of DIR, then its authority. Guests' state stays in DIR. */
export async function stopHost(dir: string): Promise<string[]> {
  const d = resolve(dir);
  const stopped: string[] = [];
  for (const g of listGuests(d)) {
    await stopGuest(d, g.name);
    stopped.push(g.name);
  }
  const authority = authorityPid(d, true);
  if (authority !== undefined) await stopProcess(authority);
  return stopped;
}
