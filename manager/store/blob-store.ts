// One vTPM instance's blobs (libtpms' permall, volatilestate, savestate...), each in its
// own encrypted file D/instances/<uuid>/<name>:
//
//   CBOR { v: 1, uuid, name, version, iv, ct, tag }          a blob
//   CBOR { v: 1, uuid, name, version, deleted: true, iv, ct, tag }   a tombstone (ct empty)
//
// sealed with the instance's own key, the associated data binding uuid, name and version
// (and whether it is a tombstone): a file moved to another instance or name, or with a
// version other than the one it was written with, fails to open (EINTEGRITY).
//
// Rollback: every store writes the next version of that name; the store refuses a blob
// older than the larger of (a) what the instance table recorded at its last write
// (`minVersions`) and (b) the highest version this store wrote or authenticated since it
// was built (EROLLBACK). A delete writes a tombstone at the next version, so an old copy
// put back after a delete is refused too, and a file missing where a version was
// recorded is refused rather than read as a fresh TPM.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { StateStore } from '../../drivers/tpm/engine.ts';
import { checkKey, open, seal } from './crypto.ts';
import { syncDir } from '../../drivers/host/state-dir.ts';
import {
  FORMAT_VERSION, asBuffer, decodeRecord, prepareDir, sealedFields, textField, uintField, writeDurable,
} from './sealed-file.ts';
import { readBounded } from '../../drivers/host/state-dir.ts';

/** The largest blob a store accepts (libtpms' largest is far below). */
export const MAX_BLOB = 1 << 20;
/** The largest blob file read: a blob plus its envelope (under 200 bytes). */
export const MAX_BLOB_FILE = MAX_BLOB + 1024;
/** A blob name: a plain file name, no dots first, no ".tmp" (writeFileAtomic's temp files). */
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
  /** This store has looked at the file on disk (so `issued` also covers versions written
   *  after the table's last record, e.g. before a crash). */
  seen: boolean;
}

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
      this.#versions.set(name, { floor: v, issued: v, seen: false });
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
   *  EINTEGRITY when the file does not authenticate, EROLLBACK when it is older than
   *  the recorded version (or missing although a version was recorded). */
  load(name: string): Uint8Array | undefined {
    checkName(name);
    const v = this.#entry(name);
    v.seen = true;
    const file = path.join(this.dir, name);
    const what = `state blob ${name} of instance ${this.uuid}`;
    const bytes = readBounded(file, MAX_BLOB_FILE, what);
    if (bytes === undefined) {
      if (v.floor > 0) throw new VtpmError('EROLLBACK', `${what} is missing, but version ${v.floor} was recorded: it was removed outside the manager`);
      return undefined;
    }
    const f = decodeRecord(bytes, what, BLOB_KEYS, ['deleted']);
    if (f.deleted !== undefined && f.deleted !== true) throw new VtpmError('EINTEGRITY', `${what}: field deleted is not true`);
    const deleted = f.deleted === true;
    const version = uintField(f, 'version', what);
    if (textField(f, 'uuid', what, 36) !== this.uuid || textField(f, 'name', what, 64) !== name) {
      throw new VtpmError('EINTEGRITY', `${what} (${file}) was written for another instance or blob name`);
    }
    const sealed = sealedFields(f, what);
    if (deleted && sealed.ct.length !== 0) throw new VtpmError('EINTEGRITY', `${what}: a tombstone with content`);
    const pt = open(this.#key, sealed, blobAad(this.uuid, name, version, deleted), what);
    if (version < v.floor) {
      throw new VtpmError('EROLLBACK', `${what} is version ${version}, older than the recorded version ${v.floor}: an old copy was put back`);
    }
    v.floor = version;
    if (version > v.issued) v.issued = version;
    return deleted ? undefined : pt;
  }

  /** Store `data` under `name` as its next version, durably (one temp write, fsync,
   *  rename, directory fsync). ESTATE on a file-system failure (cause kept, e.g. ENOSPC);
   *  the previous version then stays loadable. */
  store(name: string, data: Uint8Array): void {
    checkName(name);
    if (!(data instanceof Uint8Array)) throw new VtpmError('EINVAL', `state blob ${name} is not bytes`);
    if (data.length > MAX_BLOB) throw new VtpmError('EOVERSIZE', `state blob ${name} of ${data.length} bytes exceeds ${MAX_BLOB}`);
    this.#write(name, data, false);
  }

  /** Delete `name`: a tombstone at the next version replaces the file, so an old copy put
   *  back is refused. Nothing to do when the name never had a blob. */
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
    if (!v) this.#versions.set(name, (v = { floor: 0, issued: 0, seen: false }));
    return v;
  }

  /** Before the first write of a name, learn the version on disk (it can be above the
   *  table's record after a crash), so the write goes above every version ever written.
   *  A file that does not open (tampered, old) teaches nothing and is overwritten. */
  #learn(name: string): Versions {
    const v = this.#entry(name);
    if (!v.seen) {
      try {
        this.load(name);
      } catch {
        v.seen = true;
      }
    }
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
    v.issued = version; // burnt even if the write fails: a landed-but-unreported file never shares a version
    writeDurable(path.join(this.dir, name), encode(env), `state blob ${name} of instance ${this.uuid}`);
    v.floor = version;
  }
}
