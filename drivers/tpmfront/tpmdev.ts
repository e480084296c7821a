// The tpm-dev core: Linux /dev/tpm0 semantics (drivers/char/tpm/tpm-dev-common.c) as a
// state machine with no I/O, so every front end (raw FUSE worker, fuse-native) drives the
// same rules and a unit test can drive them too. Front ends do the waiting; the core only
// answers "what now" with an errno or a command to send.
//
// Rules (Linux's, checked in this order on write, as tpm_common_write does):
//  - one opener at a time (tpm0): a second open is busy; the front end waits up to
//    `graceMs` for a RELEASE the kernel may still be delivering, then answers EBUSY.
//  - write: > 4096 bytes → E2BIG (Linux's choice; we keep it rather than EINVAL); a response
//    still unread (or a command in flight) → EBUSY; < 10 bytes or size field ≠ bytes
//    written → EINVAL. Otherwise the bytes go to the backend and the write completes when
//    the response is in (so the node is readable when write returns: no poll needed), or,
//    as Linux's async mode does, once the command is handed over: then the front end makes
//    the next read wait for the response and a backend failure shows there as EIO.
//  - read: what fits of the pending response, the rest on the next read; 0 when nothing is
//    pending. Offsets are ignored. An unread response is dropped after `responseTimeoutMs`
//    (Linux: 120 s), checked lazily at the next operation (same result for the client).
//  - release drops the response; a backend failure fails the write with EIO.

import { parseHeader, TPM_HEADER_SIZE, TPM_MAX_COMMAND_SIZE } from '../tpm/command.ts';

export const EBADF = 9;
export const EBUSY = 16;
export const EINVAL = 22;
export const E2BIG = 7;
export const EIO = 5;
export const EINTR = 4;

export const DEFAULT_GRACE_MS = 250;
export const DEFAULT_RESPONSE_TIMEOUT_MS = 120_000;

export interface TpmDevOptions {
  /** tpmrm0-style: many openers, each with its own buffer (the front end puts a resource
   *  manager behind it: drivers/tpmrm). */
  shared?: boolean;
  graceMs?: number;
  responseTimeoutMs?: number;
  /** Clock in ms (injectable for tests). */
  now?: () => number;
}

type FileState = 'idle' | 'inflight' | 'response';

interface OpenFile {
  state: FileState;
  /** The file's own copy of its pending response (kept from open to release), its length,
   *  and how much of it was read. */
  response: Uint8Array | null;
  responseLength: number;
  readAt: number;
  responseAt: number;
}

/** Result of a write: an errno (positive) or the command to send (a view of the input). */
export type WriteStart = { errno: number } | { command: Uint8Array };

export class TpmDevCore {
  readonly shared: boolean;
  readonly graceMs: number;
  readonly responseTimeoutMs: number;
  private readonly now: () => number;
  private readonly files = new Map<number, OpenFile>();
  private nextHandle = 1; // handle 0 means "none" to fuse-native

  constructor(opts: TpmDevOptions = {}) {
    this.shared = opts.shared ?? false;
    this.graceMs = opts.graceMs ?? DEFAULT_GRACE_MS;
    this.responseTimeoutMs = opts.responseTimeoutMs ?? DEFAULT_RESPONSE_TIMEOUT_MS;
    this.now = opts.now ?? (() => performance.now());
  }

  get openCount(): number {
    return this.files.size;
  }

  /** A handle, or EBUSY (negative) when the node is taken: the caller may retry until grace ends. */
  open(): number {
    if (!this.shared && this.files.size > 0) return -EBUSY;
    const h = this.nextHandle;
    this.nextHandle = this.nextHandle >= 0x7fffffff ? 1 : this.nextHandle + 1;
    this.files.set(h, { state: 'idle', response: null, responseLength: 0, readAt: 0, responseAt: 0 });
    return h;
  }

  release(handle: number): void {
    this.files.delete(handle); // drops any pending response; an in-flight one is dropped on arrival
  }

  isOpen(handle: number): boolean {
    return this.files.has(handle);
  }

  /** Validate one write; on success the file is in flight until complete()/fail(). */
  startWrite(handle: number, data: Uint8Array): WriteStart {
    const f = this.files.get(handle);
    if (!f) return { errno: EBADF };
    this.expire(f);
    if (data.length > TPM_MAX_COMMAND_SIZE) return { errno: E2BIG };
    if (f.state !== 'idle') return { errno: EBUSY };
    if (data.length < TPM_HEADER_SIZE) return { errno: EINVAL };
    try {
      parseHeader(data, 'command'); // the size field must match the bytes written
    } catch {
      return { errno: EINVAL };
    }
    f.state = 'inflight';
    return { command: data };
  }

  /** The backend answered: keep a copy of the response in the file's own buffer (the
   *  caller's bytes may be a transport's reused buffer, which the next command — another
   *  file's, on a node with tpmrm0 — overwrites). Returns bytes written or -errno. */
  complete(handle: number, written: number, response: Uint8Array): number {
    const f = this.files.get(handle);
    if (!f) return -EBADF; // released meanwhile: response dropped
    if (response.length < TPM_HEADER_SIZE) {
      f.state = 'idle';
      return -EIO;
    }
    if (!f.response || f.response.length < response.length) f.response = new Uint8Array(Math.max(RESPONSE_BUFFER, response.length));
    f.response.set(response);
    f.responseLength = response.length;
    f.state = 'response';
    f.readAt = 0;
    f.responseAt = this.now();
    return written;
  }

  /** The command failed: the write gets -errno (EIO: the backend failed; a resource
   *  manager's refusal has its own) and the file is usable again. */
  fail(handle: number, errno = EIO): number {
    const f = this.files.get(handle);
    if (f) f.state = 'idle';
    return -errno;
  }

  /** Up to `max` bytes of the pending response (a view), empty when none; -EBADF if not open. */
  read(handle: number, max: number): Uint8Array | number {
    const f = this.files.get(handle);
    if (!f) return -EBADF;
    this.expire(f);
    if (f.state !== 'response' || !f.response) return EMPTY;
    const n = Math.min(Math.max(0, max), f.responseLength - f.readAt);
    const out = f.response.subarray(f.readAt, f.readAt + n);
    f.readAt += n;
    if (f.readAt >= f.responseLength) f.state = 'idle';
    return out;
  }

  /** True when a response waits to be read (what poll would report). */
  readable(handle: number): boolean {
    const f = this.files.get(handle);
    if (!f) return false;
    this.expire(f);
    return f.state === 'response';
  }

  private expire(f: OpenFile): void {
    if (f.state === 'response' && this.now() - f.responseAt >= this.responseTimeoutMs) f.state = 'idle';
  }
}

const EMPTY = new Uint8Array(0);
/** Each file's response buffer: a TPM response is at most this big (larger ones get their own). */
const RESPONSE_BUFFER = TPM_MAX_COMMAND_SIZE;
