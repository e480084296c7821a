// One error type for the whole stack: a stable code a caller can branch on, the cause
// kept (never swallowed), reported once at the edge (CLI, FUSE reply, TPM_FAIL).

export type VtpmErrorCode =
  | 'ETRUNC' // read past the end of a buffer
  | 'EOVERSIZE' // input larger than its bound
  | 'EINVAL' // malformed input
  | 'ETPM' // the TPM answered with a non-success response code
  | 'ELIBTPMS' // libtpms returned an error from a library call
  | 'EENGINE' // engine misuse (second init, not initialised...)
  | 'ESTATE' // state store failure
  | 'EINTEGRITY' // stored state failed authentication (tampered, corrupt, moved)
  | 'EROLLBACK' // stored state is authentic but older than the recorded version
  | 'EPERM' // permission refused (grant, xenstore)
  | 'EBUSY' // resource in use
  | 'ENOENT' // not found
  | 'ETIMEDOUT'
  | 'ECLOSED' // peer or channel went away
  | 'EIO'
  | 'ECANCELED'
  | 'EPCR' // the hardware TPM's PCRs differ from those a secret was sealed to
  | 'EPROTO'; // protocol violation on a wire we define

export class VtpmError extends Error {
  readonly code: VtpmErrorCode;
  constructor(code: VtpmErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VtpmError';
    this.code = code;
  }
}

export function isVtpmError(e: unknown, code?: VtpmErrorCode): e is VtpmError {
  return e instanceof VtpmError && (code === undefined || e.code === code);
}

/** An error as it crosses a thread or process boundary (postMessage, CBOR frame): the
 *  code and the chain of causes survive, so the edge can still say what went wrong below. */
export interface WireError {
  code: string;
  message: string;
  cause?: WireError;
}

const CAUSE_DEPTH = 8;

export function errorToWire(e: unknown, depth = 0): WireError {
  const err = e as { code?: unknown; message?: unknown; cause?: unknown } | null;
  const code = typeof err?.code === 'string' ? err.code : 'EIO';
  const message = typeof err?.message === 'string' ? err.message : String(e);
  const w: WireError = { code, message };
  if (err?.cause !== undefined && depth < CAUSE_DEPTH) w.cause = errorToWire(err.cause, depth + 1);
  return w;
}

const CODES = new Set<string>([
  'ETRUNC', 'EOVERSIZE', 'EINVAL', 'ETPM', 'ELIBTPMS', 'EENGINE', 'ESTATE', 'EINTEGRITY', 'EROLLBACK', 'EPERM', 'EBUSY', 'ENOENT', 'ETIMEDOUT', 'ECLOSED', 'EIO', 'ECANCELED', 'EPROTO', 'EPCR',
] satisfies VtpmErrorCode[]);

/** The VtpmError a WireError stands for; an unknown code (a Node errno such as ENOSPC) is
 *  kept as the cause's code and the error itself becomes `fallback`. */
export function errorFromWire(w: WireError, fallback: VtpmErrorCode = 'EIO'): VtpmError {
  const cause = w.cause ? errorFromWire(w.cause, fallback) : undefined;
  if (CODES.has(w.code)) return new VtpmError(w.code as VtpmErrorCode, w.message, cause ? { cause } : undefined);
  const inner = Object.assign(new Error(w.message, cause ? { cause } : undefined), { code: w.code });
  return new VtpmError(fallback, w.message, { cause: inner });
}

/** One line for a log or the CLI: the message, then each cause that adds something. */
export function describeError(e: unknown): string {
  let out = (e as Error)?.message ?? String(e);
  let c = (e as Error)?.cause;
  for (let i = 0; c !== undefined && i < CAUSE_DEPTH; i++, c = (c as Error)?.cause) {
    const m = (c as Error)?.message ?? String(c);
    const code = (c as { code?: unknown })?.code;
    if (!out.includes(m)) out += ` (cause: ${m}${typeof code === 'string' && !m.includes(code) ? ` [${code}]` : ''})`;
  }
  return out;
}
