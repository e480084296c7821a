// The command core (Linux tpm-interface.c's part): framing common to both TPM families
// (tag, u32 size, u32 code, then body), the one header check every transport uses, and
// the failure answer a layer gives in place of a TPM that cannot answer.
import { VtpmError } from '../base/errors.ts';
import { Reader, Writer } from './marshal.ts';
import { rcName, TPM_FAIL, TPM_RC_FAILURE } from './rc.ts';

export const TPM_HEADER_SIZE = 10;
export const TPM_MAX_COMMAND_SIZE = 4096;
/** Response tags of a plain (sessionless) response; tpm2.ts and tpm12.ts re-export them. */
export const TPM_ST_NO_SESSIONS = 0x8001;
export const TPM_TAG_RSP_COMMAND = 0x00c4;

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

export interface HeaderCheck {
  /** true (default): `bytes` is the whole message, so the size field must equal its length.
   *  false: `bytes` starts with a header read on its own (a stream, a FIFO); the size field
   *  says how much is still to come. */
  whole?: boolean;
  /** With whole: false, the largest size field accepted; beyond it (or below the header's
   *  10 bytes) the peer's framing is broken and the read fails with EIO. */
  max?: number;
}

/** Parse and check a command or response header (see HeaderCheck for the two modes). */
export function parseHeader(bytes: Uint8Array, what = 'TPM message', check: HeaderCheck = {}): ParsedHeader {
  if (bytes.length < TPM_HEADER_SIZE) {
    throw new VtpmError('ETRUNC', `${what} of ${bytes.length} bytes is shorter than the 10-byte header`);
  }
  const r = new Reader(bytes);
  const h = { tag: r.u16(), size: r.u32(), code: r.u32() };
  if (check.whole === false) {
    if (check.max !== undefined && (h.size < TPM_HEADER_SIZE || h.size > check.max)) {
      throw new VtpmError('EIO', `${what} size field ${h.size} is out of range ${TPM_HEADER_SIZE}..${check.max}`);
    }
  } else if (h.size !== bytes.length) {
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

const FAILURE: Partial<Record<'1.2' | '2.0', Uint8Array>> = {};

/** What a layer answers when the TPM below it cannot (TPM_RC_FAILURE / TPM_FAIL). One
 *  shared constant per family, built on first use: callers must not write into it. */
export function failureResponse(family: '1.2' | '2.0'): Uint8Array {
  return (FAILURE[family] ??= family === '2.0' ? errorResponse(TPM_ST_NO_SESSIONS, TPM_RC_FAILURE) : errorResponse(TPM_TAG_RSP_COMMAND, TPM_FAIL));
}
