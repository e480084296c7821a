// The state link: how vtpmd asks the manager for its NVRAM blobs (Xen's vtpm-stubdom →
// vtpmmgr). It runs over a second tpmfront/tpmback pair, so each request and each reply is
// the bytes of one tpmif exchange (at most MAX_TPMIF_DATA), a CBOR map:
//
//   request  { v: 1, uuid, op: 'load',   name, offset }
//            { v: 1, uuid, op: 'store',  name, total, offset, data }
//            { v: 1, uuid, op: 'delete', name }
//   reply    { v: 1, ok: true, found: false }                   load: no such blob
//            { v: 1, ok: true, found: true, total, data }       load: the chunk at offset
//            { v: 1, ok: true, stored: false | true }           store (true: committed)
//            { v: 1, ok: true }                                 delete
//            { v: 1, ok: false, error: WireError }              any failure, with its cause chain
//
// Blobs (≤ MAX_BLOB) travel in chunks of ≤ CHUNK bytes, in order. The server holds at most
// one transfer per link: a store's partial blob, or the snapshot a load took at offset 0
// (so a blob is never served mixed from two versions). A request that does not continue
// that transfer exactly (next offset, same name, same total) drops it; offset 0 starts a
// new one. Only the reply to a store's last chunk says `stored: true`.
import { encode, decode } from 'cbor-x';
import { VtpmError, type WireError } from '../base/errors.ts';
import type { Msg } from '../base/frame.ts';
import { bool, bytes, int, oneOf, str } from '../base/validate.ts';
import { MAX_TPMIF_DATA } from '../xen/tpmif-page.ts';

export const STATE_LINK_VERSION = 1;
/** The largest blob the link carries (libtpms' largest is far below). */
export const MAX_BLOB = 1 << 20;
/** Bytes of blob per exchange: the page holds this plus the envelope (≈ 150 bytes). */
export const CHUNK = 3584;
/** A blob name as the stores accept it: a plain file name. */
export const BLOB_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** What a uuid field may hold before it is compared (the server's own is canonical). */
const UUID_MAX = 64;

export const OPS = ['load', 'store', 'delete'] as const;
export type StateOp = (typeof OPS)[number];

export type StateRequest =
  | { op: 'load'; uuid: string; name: string; offset: number }
  | { op: 'store'; uuid: string; name: string; total: number; offset: number; data: Uint8Array }
  | { op: 'delete'; uuid: string; name: string };

export type LoadReply = { found: false } | { found: true; total: number; data: Uint8Array };
export type StoreReply = { stored: boolean };
export type DeleteReply = Record<string, never>;
export type StateReply = LoadReply | StoreReply | DeleteReply;
interface ReplyOf {
  load: LoadReply;
  store: StoreReply;
  delete: DeleteReply;
}

/** One CBOR map that fits a tpmif exchange. */
function encodeMsg(m: Msg, what: string): Uint8Array {
  const b = encode({ v: STATE_LINK_VERSION, ...m });
  if (b.length > MAX_TPMIF_DATA) throw new VtpmError('EOVERSIZE', `state link ${what} of ${b.length} bytes exceeds ${MAX_TPMIF_DATA}`);
  return b;
}

/** The map in `bytes`, version checked; EOVERSIZE/EPROTO otherwise. Byte fields of the
 *  result are views into `bytes`: copy what outlives it. */
function decodeMsg(raw: Uint8Array, what: string): Msg {
  if (raw.length > MAX_TPMIF_DATA) throw new VtpmError('EOVERSIZE', `state link ${what} of ${raw.length} bytes exceeds ${MAX_TPMIF_DATA}`);
  let m: unknown;
  try {
    m = decode(raw);
  } catch (e) {
    throw new VtpmError('EPROTO', `state link ${what} is not one well-formed CBOR item`, { cause: e });
  }
  if (typeof m !== 'object' || m === null || Object.getPrototypeOf(m) !== Object.prototype) throw new VtpmError('EPROTO', `state link ${what} is not a CBOR map`);
  const msg = m as Msg;
  if (msg.v !== STATE_LINK_VERSION) throw new VtpmError('EPROTO', `state link ${what} has version ${typeof msg.v === 'number' ? msg.v : typeof msg.v}, expected ${STATE_LINK_VERSION}`);
  return msg;
}

const blobName = (m: Msg): string => str(m, 'name', { pattern: BLOB_NAME, what: 'a plain blob name' });

/** Bytes as a plain CBOR byte string (cbor-x tags a bare Uint8Array as a typed array). */
function byteString(b: Uint8Array): Buffer {
  return Buffer.from(b.buffer, b.byteOffset, b.length);
}

export function encodeRequest(r: StateRequest): Uint8Array {
  return encodeMsg(r.op === 'store' ? { ...r, data: byteString(r.data) } : r, `${r.op} request`);
}

/** The uuid a request names, checked before anything else (the server refuses another
 *  instance's request whatever else it holds). */
export function requestUuid(m: Msg): string {
  return str(m, 'uuid', { max: UUID_MAX });
}

/** A request's map, version checked (fields not yet: requestUuid, then parseRequest). */
export function decodeRequest(raw: Uint8Array): Msg {
  return decodeMsg(raw, 'request');
}

/** A request, every field checked; its data is a view into the bytes decoded. */
export function parseRequest(m: Msg): StateRequest {
  const op = oneOf(m, 'op', OPS);
  const uuid = requestUuid(m);
  const name = blobName(m);
  switch (op) {
    case 'load':
      return { op, uuid, name, offset: int(m, 'offset', 0, MAX_BLOB) };
    case 'store': {
      const total = int(m, 'total', 0, MAX_BLOB);
      const offset = int(m, 'offset', 0, MAX_BLOB);
      return { op, uuid, name, total, offset, data: bytes(m, 'data', CHUNK) };
    }
    case 'delete':
      return { op, uuid, name };
  }
}

/** A reply; an error is carried with its code, message and causes. */
export function encodeReply(r: StateReply): Uint8Array {
  return encodeMsg('data' in r ? { ok: true, ...r, data: byteString(r.data) } : { ok: true, ...r }, 'reply');
}

/** Message text kept per error level on the wire, and how deep causes go, so an error
 *  reply always fits the page (file paths in messages can be long). */
const WIRE_MESSAGE_MAX = 400;
const WIRE_DEPTH_MAX = 6;

function trimWire(w: WireError, depth: number): WireError {
  const out: WireError = { code: w.code.slice(0, 32), message: w.message.slice(0, WIRE_MESSAGE_MAX) };
  if (w.cause && depth < WIRE_DEPTH_MAX) out.cause = trimWire(w.cause, depth + 1);
  return out;
}

export function encodeErrorReply(w: WireError): Uint8Array {
  return encodeMsg({ ok: false, error: trimWire(w, 0) }, 'error reply');
}

function wireError(v: unknown, depth: number): WireError {
  if (typeof v !== 'object' || v === null) throw new VtpmError('EINVAL', 'field error: expected a map with code and message');
  const m = v as Msg;
  const w: WireError = { code: str(m, 'code', { max: 32 }), message: str(m, 'message', { max: WIRE_MESSAGE_MAX }) };
  if (m.cause !== undefined) {
    if (depth >= WIRE_DEPTH_MAX) throw new VtpmError('EINVAL', `field error: causes nested deeper than ${WIRE_DEPTH_MAX}`);
    w.cause = wireError(m.cause, depth + 1);
  }
  return w;
}

/** A reply to `op`, every field checked: the result, or the error the server sent. Byte
 *  fields are views into `raw`. */
export function decodeReply<O extends StateOp>(raw: Uint8Array, op: O): { error: WireError } | { reply: ReplyOf[O] } {
  const m = decodeMsg(raw, `${op} reply`);
  if (!bool(m, 'ok', false)) return { error: wireError(m.error, 0) };
  let reply: StateReply;
  if (op === 'load') reply = bool(m, 'found', false) ? { found: true, total: int(m, 'total', 0, MAX_BLOB), data: bytes(m, 'data', CHUNK) } : { found: false };
  else if (op === 'store') reply = { stored: bool(m, 'stored', false) };
  else reply = {};
  return { reply: reply as ReplyOf[O] };
}
