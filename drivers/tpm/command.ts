// Command framing common to both TPM families: tag, u32 size, u32 code, then body.
import { VtpmError } from '../base/errors.ts';
import { Reader, Writer } from './marshal.ts';
import { rcName } from './rc.ts';

export const TPM_HEADER_SIZE = 10;
export const TPM_MAX_COMMAND_SIZE = 4096;

export interface ParsedHeader {
  tag: number;
  size: number;
  code: number;
}

/** Build one command: the size field is filled in from what `body` wrote. */
export function buildCommand(tag: number, code: number, body?: (w: Writer) => void): Uint8Array {
  const w = new Writer(64);
  w.u16(tag);
  const sizeAt = w.mark32();
  w.u32(code);
  body?.(w);
  w.patch32(sizeAt, w.length);
  return w.finish();
}

/** Parse and check a command or response header against the bytes it came in. */
export function parseHeader(bytes: Uint8Array, what = 'TPM message'): ParsedHeader {
  if (bytes.length < TPM_HEADER_SIZE) {
    throw new VtpmError('ETRUNC', `${what} of ${bytes.length} bytes is shorter than the 10-byte header`);
  }
  const r = new Reader(bytes);
  const h = { tag: r.u16(), size: r.u32(), code: r.u32() };
  if (h.size !== bytes.length) {
    throw new VtpmError('EINVAL', `${what} size field ${h.size} does not match its ${bytes.length} bytes`);
  }
  return h;
}

export interface Response {
  tag: number;
  rc: number;
  /** Reader positioned after the header. */
  body: Reader;
}

/** Split a response into its code and body; `expectSuccess` throws ETPM with the rc's name. */
export function parseResponse(bytes: Uint8Array, family: '1.2' | '2.0', expectSuccess = true): Response {
  const h = parseHeader(bytes, 'response');
  if (expectSuccess && h.code !== 0) throw new TpmResponseError(h.code, family);
  return { tag: h.tag, rc: h.code, body: new Reader(bytes, TPM_HEADER_SIZE) };
}

export class TpmResponseError extends VtpmError {
  readonly rc: number;
  constructor(rc: number, family: '1.2' | '2.0') {
    super('ETPM', `TPM returned ${rcName(rc, family)} (0x${rc.toString(16)})`);
    this.rc = rc;
  }
}

/** A bare error response, what a failing layer answers in place of the TPM (QEMU does this). */
export function errorResponse(tag: number, rc: number): Uint8Array {
  return buildCommand(tag, rc);
}
