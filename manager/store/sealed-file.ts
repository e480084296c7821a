// What the blob files and the instance table share: a directory only root can enter
// (0700), files written durably (the table and host records with writeFileAtomic: temp
// 0600, fsync, rename, fsync of the directory; blobs in place, slot-file.ts) and read with a size bound (readBounded in drivers/host/state-dir.ts), and a
// CBOR envelope `{ v: 1, ..., iv, ct, tag }` whose every field is checked before use. Whatever
// is wrong with a file's bytes (garbage, truncated, unknown fields, wrong types) is
// EINTEGRITY, never a crash; a failing file system is ESTATE with the system error kept
// as the cause (ENOSPC stays visible).
import * as fs from 'node:fs';
import { decode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { writeFileAtomic } from '../../drivers/host/state-dir.ts';
import { IV_BYTES, TAG_BYTES, type Sealed } from './crypto.ts';

export const FORMAT_VERSION = 1;

/** Create `dir` if needed and make it 0700 (whatever the umask or its earlier mode). */
export function prepareDir(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fs.chmodSync(dir, 0o700);
  } catch (e) {
    throw new VtpmError('ESTATE', `cannot prepare state directory ${dir}`, { cause: e });
  }
}


/** Replace `file` with `bytes` durably; a failure (ENOSPC, EIO...) is ESTATE with the cause. */
export function writeDurable(file: string, bytes: Uint8Array, what: string): void {
  try {
    writeFileAtomic(file, bytes);
  } catch (e) {
    throw stateWriteError(e, what, file);
  }
}

/** The ESTATE a failed write of `what` is reported as, its system error kept as the cause. */
export function stateWriteError(e: unknown, what: string, file: string): VtpmError {
  const code = (e as NodeJS.ErrnoException).code;
  return new VtpmError('ESTATE', `cannot write ${what} (${file})${code === 'ENOSPC' ? ': the file system is full' : ''}`, { cause: e });
}

/** A Buffer view of `u8` without copying (cbor-x writes a Buffer as a plain byte string,
 *  another Uint8Array with a typed-array tag). */
export function asBuffer(u8: Uint8Array): Buffer {
  return Buffer.isBuffer(u8) ? u8 : Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

export type Fields = Record<string, unknown>;

function bad(what: string, why: string, cause?: unknown): VtpmError {
  return new VtpmError('EINTEGRITY', `${what}: ${why}`, cause === undefined ? undefined : { cause });
}

/** Decode a CBOR map with exactly the `required` keys (plus any of `optional`), as a
 *  plain record. `v` must be FORMAT_VERSION when it is required. */
export function decodeRecord(bytes: Uint8Array, what: string, required: readonly string[], optional: readonly string[] = []): Fields {
  let value: unknown;
  try {
    value = decode(bytes);
  } catch (e) {
    throw bad(what, 'not a well-formed CBOR record (truncated or garbage)', e);
  }
  return checkRecord(value, what, required, optional);
}

/** `value` as a plain record with exactly the `required` keys and possibly `optional` ones. */
export function checkRecord(value: unknown, what: string, required: readonly string[], optional: readonly string[] = []): Fields {
  if (!isPlainRecord(value)) throw bad(what, 'not a CBOR map');
  const keys = Object.keys(value);
  for (const k of keys) if (!required.includes(k) && !optional.includes(k)) throw bad(what, `unexpected field ${JSON.stringify(k.slice(0, 40))}`);
  for (const k of required) if (!Object.hasOwn(value, k)) throw bad(what, `field ${k} is missing`);
  if (required.includes('v') && value.v !== FORMAT_VERSION) throw bad(what, `format version ${String(value.v).slice(0, 20)} is not ${FORMAT_VERSION}`);
  return value;
}

export function isPlainRecord(value: unknown): value is Fields {
  if (typeof value !== 'object' || value === null) return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** A non-negative safe integer field. */
export function uintField(f: Fields, key: string, what: string): number {
  const n = f[key];
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) throw bad(what, `field ${key} is not a non-negative integer`);
  return n;
}

/** A text field of 1..max characters (`pattern` checked when given). */
export function textField(f: Fields, key: string, what: string, max: number, pattern?: RegExp): string {
  const s = f[key];
  if (typeof s !== 'string' || s.length === 0 || s.length > max || (pattern && !pattern.test(s))) throw bad(what, `field ${key} is not a valid text`);
  return s;
}

/** A byte-string field, of exactly `len` bytes when given. */
export function bytesField(f: Fields, key: string, what: string, len?: number): Uint8Array {
  const b = f[key];
  if (!(b instanceof Uint8Array) || (len !== undefined && b.length !== len)) throw bad(what, `field ${key} is not ${len === undefined ? 'a byte string' : `${len} bytes`}`);
  return b;
}

/** The iv, ct and tag of an envelope, lengths checked. */
export function sealedFields(f: Fields, what: string): Sealed {
  return { iv: bytesField(f, 'iv', what, IV_BYTES), ct: bytesField(f, 'ct', what), tag: bytesField(f, 'tag', what, TAG_BYTES) };
}
