// The three commands the resource manager sends on its own (ContextLoad, ContextSave,
// FlushContext), built in buffers made once and patched per use, with the kernel's reading
// of their answers (tpm2_load_context / tpm2_save_context in tpm2-space.c):
//   load: TPM_RC_HANDLE or TPM_RC_REFERENCE_H0 mean the context is gone (replay counter
//         moved, or flushed outside the space) → ENOENT; TPM_RC_INTEGRITY → EINVAL; any
//         other error → EFAULT.
//   save: TPM_RC_REFERENCE_H0 means the object or session is no longer there → ENOENT; any
//         other error → EFAULT; no room left in the space's backing store → ENOMEM.
// Transport failures (the TPM unreachable) throw their VtpmError unchanged.
import { buildCommand, TPM_HEADER_SIZE, TPM_ST_NO_SESSIONS } from '../tpm/command.ts';
import { Reader } from '../tpm/marshal.ts';
import { ERRNO, rcValue, TPM_CC_CONTEXT_LOAD, TPM_CC_CONTEXT_SAVE, TPM_CC_FLUSH_CONTEXT, TPM_RC_HANDLE, TPM_RC_INTEGRITY, TPM_RC_REFERENCE_H0 } from './constants.ts';

export type Send = (cmd: Uint8Array) => Uint8Array;

/** TPMS_CONTEXT: sequence (8), savedHandle (4), hierarchy (4), then the TPM2B blob's u16 size. */
export const CONTEXT_FIXED = 18;
/** Largest saved context we take; libtpms' biggest (an RSA-4096 object) is ~3 KiB. */
const MAX_CONTEXT = 4096;

export class ContextCommands {
  private readonly loadCmd = new Uint8Array(TPM_HEADER_SIZE + MAX_CONTEXT);
  private readonly loadView = new DataView(this.loadCmd.buffer);
  private readonly saveCmd: Uint8Array;
  private readonly saveView: DataView;
  private readonly flushCmd: Uint8Array;
  private readonly flushView: DataView;

  constructor(private readonly send: Send) {
    this.loadCmd.set(buildCommand(TPM_ST_NO_SESSIONS, TPM_CC_CONTEXT_LOAD));
    this.saveCmd = buildCommand(TPM_ST_NO_SESSIONS, TPM_CC_CONTEXT_SAVE, (w) => w.u32(0));
    this.saveView = new DataView(this.saveCmd.buffer);
    this.flushCmd = buildCommand(TPM_ST_NO_SESSIONS, TPM_CC_FLUSH_CONTEXT, (w) => w.u32(0));
    this.flushView = new DataView(this.flushCmd.buffer);
  }

  /** Size of the saved context at `at` in `buf` (TPMS_CONTEXT with its blob), or -1 if it
   *  does not fit in `end`. */
  static contextSize(buf: Uint8Array, at: number, end: number): number {
    if (at + CONTEXT_FIXED > end) return -1;
    const n = CONTEXT_FIXED + ((buf[at + 16]! << 8) | buf[at + 17]!);
    return at + n > end ? -1 : n;
  }

  /** ContextLoad of the `size` bytes at `at`: the loaded handle (> 0), or -errno. */
  load(buf: Uint8Array, at: number, size: number): number {
    if (size < CONTEXT_FIXED || size > MAX_CONTEXT) return -ERRNO.EFAULT;
    this.loadCmd.set(buf.subarray(at, at + size), TPM_HEADER_SIZE);
    this.loadView.setUint32(2, TPM_HEADER_SIZE + size);
    const rsp = new Reader(this.send(this.loadCmd.subarray(0, TPM_HEADER_SIZE + size)));
    const rc = responseCode(rsp);
    if (rc < 0) return -ERRNO.EFAULT;
    if (rcValue(rc) === TPM_RC_HANDLE || rc === TPM_RC_REFERENCE_H0) return -ERRNO.ENOENT;
    if (rcValue(rc) === TPM_RC_INTEGRITY) return -ERRNO.EINVAL;
    if (rc !== 0 || rsp.remaining < 4) return -ERRNO.EFAULT;
    return rsp.u32('loadedHandle');
  }

  /** ContextSave of `handle` into `out` at `at` (room up to `cap`): bytes written, or -errno. */
  save(handle: number, out: Uint8Array, at: number, cap: number): number {
    this.saveView.setUint32(TPM_HEADER_SIZE, handle);
    const raw = this.send(this.saveCmd);
    const rsp = new Reader(raw);
    const rc = responseCode(rsp);
    if (rc < 0) return -ERRNO.EFAULT;
    if (rc === TPM_RC_REFERENCE_H0) return -ERRNO.ENOENT;
    if (rc !== 0) return -ERRNO.EFAULT;
    const size = ContextCommands.contextSize(raw, TPM_HEADER_SIZE, rsp.offset + rsp.remaining);
    if (size < 0) return -ERRNO.EFAULT;
    if (at + size > cap) return -ERRNO.ENOMEM; // the kernel's "out of backing storage"
    out.set(raw.subarray(TPM_HEADER_SIZE, TPM_HEADER_SIZE + size), at);
    return size;
  }

  /** FlushContext; the kernel ignores its answer (a handle already gone is fine). */
  flush(handle: number): void {
    this.flushView.setUint32(TPM_HEADER_SIZE, handle);
    this.send(this.flushCmd);
  }
}

/** The response code, leaving the reader after the header; -1 for a malformed response. */
function responseCode(r: Reader): number {
  if (r.remaining < TPM_HEADER_SIZE) return -1;
  r.u16('tag');
  const size = r.u32('size');
  const rc = r.u32('responseCode');
  return size === r.buf.length ? rc : -1;
}
