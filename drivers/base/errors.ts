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
  | 'EPERM' // permission refused (grant, xenstore)
  | 'EBUSY' // resource in use
  | 'ENOENT' // not found
  | 'ETIMEDOUT'
  | 'ECLOSED' // peer or channel went away
  | 'EIO'
  | 'ECANCELED'
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
