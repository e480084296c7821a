// One vTPM instance's blobs (libtpms' permall, volatilestate, savestate...), each in two
// slot files D/instances/<uuid>/<name> and <name>@1 rewritten in place alternately
// (slot-file.ts), each slot holding one version as the record
//
//   CBOR { v: 1, uuid, name, version, iv, ct, tag }          a blob
//   CBOR { v: 1, uuid, name, version, deleted: true, iv, ct, tag }   a tombstone (ct empty)
//
// sealed with the instance's own key, the associated data binding uuid, name and version
// (and whether it is a tombstone): a file moved to another instance or name, or with a
// version other than the one it was written with, fails to open (EINTEGRITY). A load
// takes the newest slot that authenticates; a slot that does not (torn by a crash while it
// was written, which was then never acknowledged) leaves the other one. The one-file
// layout's file is slot 0 as it was, so an older state dir opens and moves to slots as its
// blobs are next written.
//
// Rollback: every store writes the next version of that name; the store refuses a blob
// older than the larger of (a) what the instance table recorded at its last write
// (`minVersions`) and (b) the highest version this store wrote or authenticated since it
// was built (EROLLBACK). A delete writes a tombstone at the next version, so an old copy
// put back after a delete is refused too, and a file missing where a version was
// recorded is refused rather than read as a fresh TPM. These hold per blob, whatever mix
// of its two slots is damaged, removed or replaced by older copies.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { StateStore } from '../../drivers/tpm/engine.ts';
import { checkKey, open, seal } from './crypto.ts';
import { readBounded, syncDir } from '../../drivers/host/state-dir.ts';
import {
  FORMAT_VERSION, asBuffer, decodeRecord, prepareDir, sealedFields, textField, uintField,
} from './sealed-file.ts';
import { SLOTS, type Slot, slotFile, slotRecord, writeSlot } from './slot-file.ts';

/** The largest blob a store accepts (libtpms' largest is far below). */
export const MAX_BLOB = 1 << 20;
/** The largest slot file read or written: a blob plus its envelope (under 200 bytes) and
 *  the slot header, rounded up to pages. */
export const MAX_BLOB_FILE = MAX_BLOB + 4096;
/** A blob name: a plain file name, no dots first, no ".tmp" (the one-file layout's temp
 *  files), no '@' (slot 1's file is <name>@1). */
export const BLOB_NAME = /^(?!.*\.tmp)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** An instance uuid, canonical lowercase form (what crypto.randomUUID gives). */
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const BLOB_KEYS = ['v', 'uuid', 'name', 'version', 'iv', 'ct', 'tag'] as const;
const EMPTY = Buffer.alloc(0);

export function instancesDir(stateDir: string): string {
  return path.join(stateDir, 'instances');
}

export function instanceDir(stateDir: string, uuid: string): string {
  checkUuid(uuid);
  return path.join(instancesDir(stateDir), uuid);
}

export function checkUuid(uuid: string): void {
  if (typeof uuid !== 'string' || !UUID.test(uuid)) throw new VtpmError('EINVAL', `instance uuid ${JSON.stringify(String(uuid).slice(0, 60))} is not a lowercase canonical uuid`);
}

function checkName(name: string): void {
  if (typeof name !== 'string' || !BLOB_NAME.test(name)) throw new VtpmError('EINVAL', `state blob name ${JSON.stringify(String(name).slice(0, 80))} is not a plain name`);
}

/** The associated data of a blob or tombstone: what it is, for whom, which version. */
function blobAad(uuid: string, name: string, version: number, deleted: boolean): Buffer {
  return encode([deleted ? 'vtpm-tombstone' : 'vtpm-blob', FORMAT_VERSION, uuid, name, version]);
}

/** Remove an instance's blob directory durably (the instance is destroyed). */
export function removeInstanceDir(stateDir: string, uuid: string): void {
  const dir = instanceDir(stateDir, uuid);
  if (!fs.existsSync(dir)) return; // it never stored a blob
  try {
    fs.rmSync(dir, { recursive: true, force: true });
    syncDir(path.dirname(dir));
  } catch (e) {
    throw new VtpmError('ESTATE', `cannot remove the state of instance ${uuid} (${dir})`, { cause: e });
  }
}

export interface InstanceStoreOptions {
  /** The state dir D; the blobs go to D/instances/<uuid>/. */
  stateDir: string;
  uuid: string;
  /** The instance's own 32-byte key (kept in the instance table). */
  key: Uint8Array;
  /** The version per blob name that the instance table last recorded (its `blobs`). */
  minVersions?: Readonly<Record<string, number>>;
}

interface Versions {
  /** The lowest version load accepts: the table's, raised by every write and authenticated load. */
  floor: number;
  /** The highest version used, even by a write that failed: the next write goes above it. */
  issued: number;
  /** This store has looked at the files on disk (so `issued` also covers versions written
   *  after the table's last record, e.g. before a crash). */
  seen: boolean;
  /** The slot holding the newest version known; the next write goes to the other one. */
  newest: Slot | undefined;
}

/** What one slot file holds: nothing, a record that authenticated, or why it did not. */
type SlotRead =
  | { slot: Slot; kind: 'absent' }
  | { slot: Slot; kind: 'record'; version: number; deleted: boolean; pt: Buffer }
  | { slot: Slot; kind: 'bad'; error: VtpmError };

/** The blob files of one instance; implements the engine's StateStore seam. Synchronous,
 *  like libtpms' callbacks. Not for two stores (processes) on one instance at a time. */
export class InstanceStore implements StateStore {
  readonly uuid: string;
  readonly dir: string;
  readonly #key: Uint8Array;
  readonly #versions = new Map<string, Versions>();

  constructor(opts: InstanceStoreOptions) {
    checkKey(opts.key, `the key of instance ${opts.uuid}`);
    this.uuid = opts.uuid;
    this.dir = instanceDir(opts.stateDir, opts.uuid);
    this.#key = opts.key;
    for (const [name, v] of Object.entries(opts.minVersions ?? {})) {
      checkName(name);
      if (!Number.isSafeInteger(v) || v < 0) throw new VtpmError('EINVAL', `recorded version of blob ${name} is not a non-negative integer`);
      this.#versions.set(name, { floor: v, issued: v, seen: false, newest: undefined });
    }
    prepareDir(opts.stateDir);
    prepareDir(instancesDir(opts.stateDir));
    prepareDir(this.dir);
  }

  /** name → version now, for the instance table to record (its `blobs`). */
  versions(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, v] of this.#versions) if (v.floor > 0) out[name] = v.floor;
    return out;
  }

  /** The blob stored under `name`; undefined when there is none or it was deleted.
   *  EINTEGRITY when no slot at or above the recorded version authenticates and one does
   *  not authenticate; EROLLBACK when every slot is older than the recorded version (or
   *  missing although a version was recorded). */
  load(name: string): Uint8Array | undefined {
    checkName(name);
    const v = this.#entry(name);
    const what = `state blob ${name} of instance ${this.uuid}`;
    const reads = this.#scan(name, v);
    const records = reads.filter((r) => r.kind === 'record');
    const best = records.sort((a, b) => b.version - a.version)[0];
    if (best && best.version >= v.floor) {
      v.floor = best.version;
      return best.deleted ? undefined : best.pt;
    }
    const bad = reads.find((r) => r.kind === 'bad');
    const older = best ? `; the newest slot that opens is version ${best.version}, older than the recorded version ${v.floor}` : '';
    if (bad) throw new VtpmError('EINTEGRITY', `${bad.error.message}${older}`, { cause: bad.error });
    if (best) throw new VtpmError('EROLLBACK', `${what} is version ${best.version}, older than the recorded version ${v.floor}: an old copy was put back`);
    if (v.floor > 0) throw new VtpmError('EROLLBACK', `${what} is missing, but version ${v.floor} was recorded: it was removed outside the manager`);
    return undefined;
  }

  /** Store `data` under `name` as its next version, durably (the slot not holding the
   *  newest version rewritten in place + fdatasync). ESTATE on a file-system failure (cause
   *  kept, e.g. ENOSPC); the previous version then stays loadable. */
  store(name: string, data: Uint8Array): void {
    checkName(name);
    if (!(data instanceof Uint8Array)) throw new VtpmError('EINVAL', `state blob ${name} is not bytes`);
    if (data.length > MAX_BLOB) throw new VtpmError('EOVERSIZE', `state blob ${name} of ${data.length} bytes exceeds ${MAX_BLOB}`);
    this.#write(name, data, false);
  }

  /** Delete `name`: a tombstone at the next version goes to the next slot, so an old copy
   *  put back is refused. Nothing to do when the name never had a blob. */
  delete(name: string): void {
    checkName(name);
    const v = this.#learn(name);
    if (v.issued === 0) return;
    this.#write(name, EMPTY, true);
  }

  /** Remove the whole instance directory (the instance is destroyed; the table entry goes
   *  with the caller's next table write). */
  destroy(): void {
    removeInstanceDir(path.dirname(path.dirname(this.dir)), this.uuid);
    this.#versions.clear();
  }

  #entry(name: string): Versions {
    let v = this.#versions.get(name);
    if (!v) this.#versions.set(name, (v = { floor: 0, issued: 0, seen: false, newest: undefined }));
    return v;
  }

  /** Read and authenticate both slots of `name`, and learn from them: the highest version
   *  that authenticated raises `issued` and names the newest slot. */
  #scan(name: string, v: Versions): SlotRead[] {
    const reads = SLOTS.map((slot) => this.#readSlot(name, slot));
    v.seen = true;
    let top = -1;
    for (const r of reads) {
      if (r.kind !== 'record' || r.version <= top) continue;
      top = r.version;
      v.newest = r.slot;
      if (r.version > v.issued) v.issued = r.version;
    }
    return reads;
  }

  #readSlot(name: string, slot: Slot): SlotRead {
    const file = slotFile(this.dir, name, slot);
    const what = `state blob ${name} of instance ${this.uuid} (${file})`;
    let bytes: Buffer | undefined;
    try {
      bytes = readBounded(file, MAX_BLOB_FILE, what);
      if (bytes === undefined) return { slot, kind: 'absent' };
      const f = decodeRecord(slotRecord(bytes, slot, what), what, BLOB_KEYS, ['deleted']);
      if (f.deleted !== undefined && f.deleted !== true) throw new VtpmError('EINTEGRITY', `${what}: field deleted is not true`);
      const deleted = f.deleted === true;
      const version = uintField(f, 'version', what);
      if (textField(f, 'uuid', what, 36) !== this.uuid || textField(f, 'name', what, 64) !== name) {
        throw new VtpmError('EINTEGRITY', `${what} was written for another instance or blob name`);
      }
      const sealed = sealedFields(f, what);
      if (deleted && sealed.ct.length !== 0) throw new VtpmError('EINTEGRITY', `${what}: a tombstone with content`);
      const pt = open(this.#key, sealed, blobAad(this.uuid, name, version, deleted), what);
      return { slot, kind: 'record', version, deleted, pt };
    } catch (e) {
      // A failing file system (ESTATE) is not a damaged slot: it stops the load.
      if (e instanceof VtpmError && e.code === 'EINTEGRITY') return { slot, kind: 'bad', error: e };
      throw e;
    }
  }

  /** Before the first write of a name, learn the versions on disk (they can be above the
   *  table's record after a crash), so the write goes above every version ever written and
   *  into the slot that does not hold the newest. A slot that does not open teaches
   *  nothing and may be the one rewritten. */
  #learn(name: string): Versions {
    const v = this.#entry(name);
    if (!v.seen) this.#scan(name, v);
    return v;
  }

  #write(name: string, data: Uint8Array, deleted: boolean): void {
    const v = this.#learn(name);
    const version = Math.max(v.floor, v.issued) + 1;
    const sealed = seal(this.#key, data, blobAad(this.uuid, name, version, deleted));
    const env: Record<string, unknown> = { v: FORMAT_VERSION, uuid: this.uuid, name, version };
    if (deleted) env.deleted = true;
    env.iv = sealed.iv;
    env.ct = asBuffer(sealed.ct);
    env.tag = sealed.tag;
    v.issued = version; // burnt even if the write fails: a landed-but-unreported slot never shares a version
    const slot: Slot = v.newest === 0 ? 1 : 0;
    writeSlot(slotFile(this.dir, name, slot), encode(env), MAX_BLOB_FILE, `state blob ${name} of instance ${this.uuid}`);
    v.floor = version;
    v.newest = slot;
  }
}
