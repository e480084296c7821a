// The instance table D/table: every instance's uuid, name, TPM version, key, creation time,
// the version of each of its blobs, and free-form validated `meta`. Plaintext CBOR
//
//   { v: 1, epoch, instances: [{ uuid, name, tpm, key, created, blobs: {name: version}, meta }] }
//
// sealed with AES-256-GCM under the host's 32-byte root key (AAD binds 'vtpm-table', the
// format version and the epoch), stored as the envelope CBOR { v: 1, epoch, iv, ct, tag }.
//
// The epoch is anchored by a hardware monotonic counter the caller reads: a table is
// accepted when its epoch equals the counter, or is one above it (a table write whose
// counter increment a crash interrupted: `bumpPending`, the caller finishes the bump).
// Anything else is an old copy of the state dir put back (EROLLBACK).
//
// The protocol a caller follows (startEpoch / commitTable below implement it):
//   at host start:   (1) read counter C; open the table (epoch C, or C+1 = bump pending,
//                        then increment the counter first so it reads C+1 = E);
//                    (2) write the table with epoch E+1;  (3) increment the counter → E+1.
//   at every table change and at clean stop: check the counter still reads E, write the
//                    table with epoch E+1, increment the counter → E+1.
// A crash between (2) and (3) leaves table E+1 and counter E: the next start accepts it as
// bump pending. A crash before (2) leaves table E and counter E: accepted as is.
//
// The window that remains: blob versions reach the table only at table writes. Between two
// table writes (within one epoch), a blob file copied and put back after a crash, before the
// manager starts again, is accepted if its version is at or above the table's record for
// it (a running store refuses it: it remembers the versions it wrote). Writing the table
// more often (e.g. after each savestate) narrows the window; the counter's increment rate
// limits how often that can be done.
import * as path from 'node:path';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { KEY_BYTES, checkKey, open, seal } from './crypto.ts';
import { BLOB_NAME, UUID } from './blob-store.ts';
import {
  FORMAT_VERSION, asBuffer, bytesField, checkRecord, decodeRecord, isPlainRecord, prepareDir, sealedFields, textField, uintField, writeDurable,
} from './sealed-file.ts';
import { readBounded } from '../../drivers/host/state-dir.ts';

export type TpmFamily = '1.2' | '2.0';
export type MetaValue = string | number | boolean | null | Uint8Array;

export interface InstanceRecord {
  uuid: string;
  /** A human name, 1..128 characters, no control characters. */
  name: string;
  tpm: TpmFamily;
  /** The instance's 32-byte blob key. */
  key: Uint8Array;
  /** Creation time, ms since 1970. */
  created: number;
  /** Blob name → version last recorded (InstanceStore.versions()). */
  blobs: Record<string, number>;
  /** Further fields (bound guest, EK certificate...): keys are plain names, values scalars or bytes. */
  meta: Record<string, MetaValue>;
}

export interface Table {
  /** The epoch this table was read or last written with. */
  epoch: number;
  instances: InstanceRecord[];
}

export interface OpenedTable {
  table: Table;
  /** The table is one epoch above the counter: finish the interrupted increment. */
  bumpPending: boolean;
  /** No table existed: this is a new, empty one (not yet written). */
  created: boolean;
}

export const TABLE_FILE = 'table';
export const MAX_TABLE_FILE = 64 << 20;
export const MAX_INSTANCES = 65536;
const MAX_META_KEYS = 64;
const MAX_META_TEXT = 4096;
const MAX_META_BYTES = 64 << 10;
const META_KEY = /^[A-Za-z][A-Za-z0-9_-]{0,63}$/;
// eslint-disable-next-line no-control-regex
const HUMAN_NAME = /^[^\u0000-\u001f\u007f]{1,128}$/;

const ENVELOPE_KEYS = ['v', 'epoch', 'iv', 'ct', 'tag'] as const;
const PLAIN_KEYS = ['v', 'epoch', 'instances'] as const;
const INSTANCE_KEYS = ['uuid', 'name', 'tpm', 'key', 'created', 'blobs', 'meta'] as const;

export function tableFile(stateDir: string): string {
  return path.join(stateDir, TABLE_FILE);
}

function tableAad(epoch: number): Buffer {
  return encode(['vtpm-table', FORMAT_VERSION, epoch]);
}

function counterNumber(value: number | bigint): number {
  const n = typeof value === 'bigint' ? Number(value) : value;
  if (!Number.isSafeInteger(n) || n < 0 || (typeof value === 'bigint' && BigInt(n) !== value)) {
    throw new VtpmError('EINVAL', `hardware counter value ${String(value)} is not a non-negative safe integer`);
  }
  return n;
}

/** Read D/table under `rootKey` and check its epoch against the hardware counter's
 *  `counterValue`. Missing table: a new empty one when the counter is 0 or `fresh` is set,
 *  else ENOENT. `fresh` with a table present: EBUSY (never overwrite a table silently). */
export function openTable(stateDir: string, rootKey: Uint8Array, counterValue: number | bigint, opts: { fresh?: boolean } = {}): OpenedTable {
  checkKey(rootKey, 'the root key');
  const counter = counterNumber(counterValue);
  const file = tableFile(stateDir);
  const what = `the instance table (${file})`;
  const bytes = readBounded(file, MAX_TABLE_FILE, 'the instance table');
  if (bytes === undefined) {
    if (counter === 0 || opts.fresh) return { table: { epoch: counter, instances: [] }, bumpPending: false, created: true };
    throw new VtpmError('ENOENT', `there is no instance table in ${stateDir}, but the hardware counter is at ${counter}: the state dir is missing or was replaced (start with fresh to begin again, losing every instance)`);
  }
  if (opts.fresh) throw new VtpmError('EBUSY', `${what} exists: refusing to start fresh over it (remove the state dir first)`);
  const env = decodeRecord(bytes, what, ENVELOPE_KEYS);
  const epoch = uintField(env, 'epoch', what);
  // Authenticate before judging the epoch, so EROLLBACK always means a genuine old table.
  const plain = open(rootKey, sealedFields(env, what), tableAad(epoch), what);
  const table = parsePlain(plain, what);
  if (table.epoch !== epoch) throw new VtpmError('EINTEGRITY', `${what}: sealed epoch ${table.epoch} differs from its envelope's ${epoch}`);
  if (epoch !== counter && epoch !== counter + 1) {
    throw new VtpmError('EROLLBACK', `the instance table is from epoch ${epoch} but the hardware counter is at ${counter}: ${epoch < counter ? 'an old copy of the state dir was put back' : 'the table is newer than the counter allows (another host\'s state, or the counter was reset)'}`);
  }
  return { table, bumpPending: epoch === counter + 1, created: false };
}

/** Seal `table` with `epoch` and write it durably to D/table; `table.epoch` becomes `epoch`
 *  once written. `epoch` must be above the table's current one. */
export function saveTable(stateDir: string, rootKey: Uint8Array, table: Table, epoch: number): void {
  checkKey(rootKey, 'the root key');
  if (!Number.isSafeInteger(epoch) || epoch <= table.epoch) throw new VtpmError('EINVAL', `table epoch ${epoch} is not above the current ${table.epoch}`);
  const what = 'the instance table';
  if (table.instances.length > MAX_INSTANCES) throw new VtpmError('EOVERSIZE', `${table.instances.length} instances exceed ${MAX_INSTANCES}`);
  const seen = new Set<string>();
  const instances = table.instances.map((r) => {
    checkInstance(r, what, seen, 'EINVAL');
    return { uuid: r.uuid, name: r.name, tpm: r.tpm, key: asBuffer(r.key), created: r.created, blobs: r.blobs, meta: encodeMeta(r.meta) };
  });
  const plain = encode({ v: FORMAT_VERSION, epoch, instances });
  const sealed = seal(rootKey, plain, tableAad(epoch));
  const env = encode({ v: FORMAT_VERSION, epoch, iv: sealed.iv, ct: sealed.ct, tag: sealed.tag });
  if (env.length > MAX_TABLE_FILE) throw new VtpmError('EOVERSIZE', `the instance table of ${env.length} bytes exceeds ${MAX_TABLE_FILE}`);
  prepareDir(stateDir);
  writeDurable(tableFile(stateDir), env, what);
  table.epoch = epoch;
}

// ---- the epoch protocol, over the hardware counter ----

/** The hardware monotonic counter (an NV counter index on the host's TPM). */
export interface MonotonicCounter {
  read(): Promise<number | bigint>;
  /** Increment by one; resolves to the new value. */
  increment(): Promise<number | bigint>;
}

async function bump(counter: MonotonicCounter, expect: number): Promise<void> {
  const got = counterNumber(await counter.increment());
  if (got !== expect) throw new VtpmError('ESTATE', `the hardware counter went to ${got} instead of ${expect}: something else increments it`);
}

/** Host start: read the counter C, open the table (epoch C, or C+1 with the interrupted
 *  increment finished here), write it with the next epoch and increment the counter.
 *  Returns the table, at the epoch the counter now holds. */
export async function startEpoch(stateDir: string, rootKey: Uint8Array, counter: MonotonicCounter, opts: { fresh?: boolean } = {}): Promise<OpenedTable> {
  const c = counterNumber(await counter.read());
  const opened = openTable(stateDir, rootKey, c, opts);
  if (opened.bumpPending) await bump(counter, c + 1);
  await commitTable(stateDir, rootKey, opened.table, counter);
  return opened;
}

/** Every table change and the clean stop: check the counter still holds the table's epoch
 *  E, write the table with epoch E+1, increment the counter to E+1. A crash between the
 *  write and the increment is what openTable's bumpPending covers. */
export async function commitTable(stateDir: string, rootKey: Uint8Array, table: Table, counter: MonotonicCounter): Promise<void> {
  const c = counterNumber(await counter.read());
  if (c !== table.epoch) throw new VtpmError('ESTATE', `the hardware counter is at ${c} but the table is at epoch ${table.epoch}: refusing to write (the counter moved under the manager)`);
  saveTable(stateDir, rootKey, table, c + 1);
  await bump(counter, c + 1);
}

// ---- validation of the sealed plaintext ----

function parsePlain(plain: Uint8Array, what: string): Table {
  const f = decodeRecord(plain, what, PLAIN_KEYS);
  const epoch = uintField(f, 'epoch', what);
  const list = f.instances;
  if (!Array.isArray(list) || list.length > MAX_INSTANCES) throw new VtpmError('EINTEGRITY', `${what}: instances is not a list of at most ${MAX_INSTANCES}`);
  const seen = new Set<string>();
  const instances = list.map((item: unknown, i: number): InstanceRecord => {
    const w = `${what}, instance ${i}`;
    const r = checkRecord(item, w, INSTANCE_KEYS);
    const rec: InstanceRecord = {
      uuid: textField(r, 'uuid', w, 36, UUID),
      name: textField(r, 'name', w, 128, HUMAN_NAME),
      tpm: r.tpm as TpmFamily,
      key: bytesField(r, 'key', w, KEY_BYTES),
      created: uintField(r, 'created', w),
      blobs: r.blobs as Record<string, number>,
      meta: r.meta as Record<string, MetaValue>,
    };
    checkInstance(rec, w, seen, 'EINTEGRITY');
    return rec;
  });
  return { epoch, instances };
}

/** Check one record (what saveTable writes and openTable reads back): EINVAL for a
 *  caller's bad record, EINTEGRITY for one read from the file. */
function checkInstance(r: InstanceRecord, what: string, seen: Set<string>, code: 'EINVAL' | 'EINTEGRITY'): void {
  const fail = (why: string): never => {
    throw new VtpmError(code, `${what}: ${why}`);
  };
  if (typeof r.uuid !== 'string' || !UUID.test(r.uuid)) fail('uuid is not a lowercase canonical uuid');
  if (seen.has(r.uuid)) fail(`uuid ${r.uuid} appears twice`);
  seen.add(r.uuid);
  if (typeof r.name !== 'string' || !HUMAN_NAME.test(r.name)) fail(`instance ${r.uuid}: name is not 1..128 printable characters`);
  if (r.tpm !== '1.2' && r.tpm !== '2.0') fail(`instance ${r.uuid}: tpm is not '1.2' or '2.0'`);
  if (!(r.key instanceof Uint8Array) || r.key.length !== KEY_BYTES) fail(`instance ${r.uuid}: key is not ${KEY_BYTES} bytes`);
  if (!Number.isSafeInteger(r.created) || r.created < 0) fail(`instance ${r.uuid}: created is not a time`);
  if (!isPlainRecord(r.blobs)) fail(`instance ${r.uuid}: blobs is not a map`);
  for (const [k, v] of Object.entries(r.blobs)) {
    if (!BLOB_NAME.test(k) || !Number.isSafeInteger(v) || v < 0) fail(`instance ${r.uuid}: blob entry ${JSON.stringify(k.slice(0, 64))} is not name → version`);
  }
  if (!isPlainRecord(r.meta)) fail(`instance ${r.uuid}: meta is not a map`);
  const keys = Object.keys(r.meta);
  if (keys.length > MAX_META_KEYS) fail(`instance ${r.uuid}: meta has more than ${MAX_META_KEYS} fields`);
  for (const k of keys) {
    const v: unknown = r.meta[k];
    const ok =
      META_KEY.test(k) &&
      (v === null || typeof v === 'boolean' || (typeof v === 'number' && Number.isFinite(v)) ||
        (typeof v === 'string' && v.length <= MAX_META_TEXT) || (v instanceof Uint8Array && v.length <= MAX_META_BYTES));
    if (!ok) fail(`instance ${r.uuid}: meta field ${JSON.stringify(k.slice(0, 64))} is not a plain name with a scalar or bytes value`);
  }
}

/** meta with its byte values as Buffers (plain CBOR byte strings). */
function encodeMeta(meta: Record<string, MetaValue>): Record<string, MetaValue> {
  const out: Record<string, MetaValue> = {};
  for (const [k, v] of Object.entries(meta)) out[k] = v instanceof Uint8Array ? asBuffer(v) : v;
  return out;
}
