// The toolstack (Xen's xl/libxl role) for one host dir: starts the authority, then for each
// guest its vtpmd and its tpmfront node, wires them together and records what runs.
//
// Layout under DIR (0700): authority.sock and mem/ (drivers/xen), and per guest DIR/NAME/
// with state/ (the vTPM's blobs), dev/tpm0 (the node), vtpmd.log, front.log, guest.cbor.
import { decode, encode } from 'cbor-x';
import { readSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeSync, chmodSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { alive, startDaemon, stopProcess } from '../drivers/host/daemon.ts';
import { builtScript, ensureBuilt } from '../drivers/base/modules.ts';
import { writeFileAtomic } from '../drivers/host/state-dir.ts';
import { detach } from '../drivers/tpmfront/mountpoint.ts';
import type { TpmVersion } from '../drivers/tpm/engine.ts';
import { VtpmError } from '../drivers/base/errors.ts';
import { authorityRunning, startAuthority } from '../drivers/xen/authority-launch.ts';
import * as tpm12 from '../drivers/tpm/tpm12.ts';
import * as tpm2 from '../drivers/tpm/tpm2.ts';

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

/** The authority for DIR: running already, or started detached now (build/ is current). */
async function ensureAuthority(dir: string): Promise<void> {
  if (await authorityRunning(dir)) return;
  const a = await startAuthority(dir, { lifetime: 'detached', log: join(dir, 'authority.log'), script: builtScript('drivers/xen/authority') });
  writeFileAtomic(join(dir, 'host.cbor'), encode({ v: RECORD_VERSION, authority: a.pid }));
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
  await ensureAuthority(dir);
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
    await waitNodeAnswers(rec, timeoutMs);
  } catch (e) {
    await stopGuest(dir, o.name);
    throw e;
  }
  return rec;
}

/** The node is up when a GetRandom through it succeeds (like a driver's probe). */
async function waitNodeAnswers(rec: GuestRecord, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    if (!alive(rec.front.pid)) throw new VtpmError('EIO', `tpmfront for ${rec.name} exited (see ${join(rec.node, '../../front.log')})`);
    if (!alive(rec.vtpmd.pid)) throw new VtpmError('EIO', `vtpmd for ${rec.name} exited (see ${join(rec.node, '../../vtpmd.log')})`);
    try {
      probeNode(rec.node, rec.tpm);
      return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new VtpmError('ETIMEDOUT', `node ${rec.node} did not answer within ${timeoutMs} ms`, { cause: last });
}

/** One GetRandom through the node, as a driver's probe would: the node answers. */
export function probeNode(node: string, tpm: TpmVersion): void {
  const fd = openSync(node, 'r+');
  try {
    const cmd = tpm === '2.0' ? tpm2.getRandom(8) : tpm12.getRandom(8);
    writeSync(fd, cmd);
    const rsp = Buffer.alloc(4096);
    const n = readSync(fd, rsp, 0, rsp.length, null);
    if (tpm === '2.0') tpm2.parseGetRandom(rsp.subarray(0, n));
    else tpm12.parseGetRandom(rsp.subarray(0, n));
  } finally {
    closeSync(fd);
  }
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
  const hostFile = join(d, 'host.cbor');
  if (existsSync(hostFile)) {
    const rec = decode(readFileSync(hostFile)) as { v: number; authority: number };
    if (rec?.v === RECORD_VERSION && Number.isInteger(rec.authority)) await stopProcess(rec.authority);
    rmSync(hostFile, { force: true });
  }
  return stopped;
}
