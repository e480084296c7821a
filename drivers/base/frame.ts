// Length-limited CBOR framing: the authority socket, daemons' readiness reports.
//
// Frame = u32 big-endian body length, then a CBOR map. Every message carries `v`
// (PROTO_VERSION). Requests: {v, id, op, ...args}. Replies: {v, id, ok: true, ...result}
// or {v, id, err: VtpmErrorCode, msg}. Unsolicited events: {v, ev, ...}.
// A body over MAX_FRAME is refused (EOVERSIZE) and the stream cannot be resynchronised,
// so the receiver replies with the error and closes that connection only.

import { encode, decode } from 'cbor-x';
import { VtpmError } from './errors.ts';

export const PROTO_VERSION = 1;
export const MAX_FRAME = 64 * 1024;

export type Msg = Record<string, unknown>;

export function encodeFrame(msg: Msg): Buffer {
  const body = encode(msg);
  if (body.length > MAX_FRAME) throw new VtpmError('EOVERSIZE', `frame of ${body.length} bytes exceeds ${MAX_FRAME}`);
  const out = Buffer.allocUnsafe(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  body.copy(out, 4);
  return out;
}

export type FrameResult = { msg: Msg } | { error: VtpmError; fatal: boolean };

/** Incremental frame decoder: feed chunks, get whole messages or per-frame errors. */
export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);
  private dead = false;

  push(chunk: Buffer): FrameResult[] {
    if (this.dead) return [];
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: FrameResult[] = [];
    while (this.buf.length >= 4) {
      const len = this.buf.readUInt32BE(0);
      if (len > MAX_FRAME) {
        this.dead = true;
        this.buf = Buffer.alloc(0);
        out.push({ error: new VtpmError('EOVERSIZE', `frame of ${len} bytes exceeds ${MAX_FRAME}`), fatal: true });
        return out;
      }
      if (this.buf.length < 4 + len) break;
      const body = this.buf.subarray(4, 4 + len);
      this.buf = this.buf.subarray(4 + len);
      let msg: unknown;
      try {
        msg = decode(body);
      } catch (e) {
        out.push({ error: new VtpmError('EPROTO', `undecodable CBOR frame: ${(e as Error).message}`, { cause: e }), fatal: false });
        continue;
      }
      if (typeof msg !== 'object' || msg === null || Array.isArray(msg) || msg instanceof Uint8Array) {
        out.push({ error: new VtpmError('EPROTO', 'frame is not a CBOR map'), fatal: false });
        continue;
      }
      const m = msg as Msg;
      if (m.v !== PROTO_VERSION) {
        out.push({ error: new VtpmError('EPROTO', `unsupported protocol version ${String(m.v)}`), fatal: false });
        continue;
      }
      out.push({ msg: m });
    }
    return out;
  }
}
