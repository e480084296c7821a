// The TPM 2.0 resource manager behind tpmrm0, after Linux' drivers/char/tpm/tpm2-space.c and
// tpm-dev-common.c's tpm_dev_transmit. It runs over a SyncTransport, on the thread that
// serves the node: for each command, synchronously,
//   prepare  the command code must be one the TPM lists (else a made-up response,
//            TPM_RC_COMMAND_CODE in tpm2-tss' resource-manager layer, no TPM access) and
//            the bytes must hold its handles (else EINVAL); the space's saved objects and
//            sessions are ContextLoad-ed; virtual transient handles in the handle area are
//            rewritten to the TPM's (one not in the space: EINVAL).
//   command  sent as rewritten; the response is kept in our buffer.
//   commit   a new transient handle in the response gets a free slot and its virtual
//            handle (none free: flushed, ENOMEM); a new session takes a session slot;
//            GetCapability(HANDLES) lists only this space's transient objects, renamed;
//            then every object is ContextSave-d and flushed, every session ContextSave-d
//            (a session the TPM no longer has is forgotten).
// Any failure on the way flushes what the command loaded (objects and sessions, as the
// kernel's tpm2_flush_space) and leaves the space's tables as they were before the command;
// the caller's write fails with the errno. Closing a space flushes its sessions (objects are
// never left loaded). Per-command state lives in buffers made once (the kernel's work space).
//
// One deliberate difference: when a session's context cannot be loaded (gone), the kernel
// does not step past its saved bytes, so every later session of that space is read from the
// wrong place and dropped too; here each session's bytes are stepped over.
import { VtpmError } from '../base/errors.ts';
import { TPM_HEADER_SIZE, TPM_ST_NO_SESSIONS } from '../tpm/command.ts';
import type { SyncTransport } from '../tpm/transport.ts';
import { TPM_CAP_HANDLES } from '../tpm/tpm2.ts';
import { CommandAttributes } from './command-attributes.ts';
import {
  ERRNO,
  HT_HMAC_SESSION,
  HT_MASK,
  HT_POLICY_SESSION,
  HT_TRANSIENT,
  SAVED,
  slotOf,
  SPACE_OBJECTS,
  TPM_CC_GET_CAPABILITY,
  TPM_RC_COMMAND_CODE,
  TSS2_RESMGR_TPM_RC_LAYER,
  virtualHandle,
} from './constants.ts';
import { ContextCommands } from './context-commands.ts';
import { ContextTable, Space } from './space.ts';

/** Largest response we take from the TPM (libtpms' is 4096). */
const MAX_RESPONSE = 8192;

export interface ResourceManagerOptions {
  /** Bytes of saved contexts per space and kind (default: the kernel's 16 KiB). */
  spaceBufferSize?: number;
}

export class ResourceManager {
  readonly attributes = new CommandAttributes();
  private readonly ctx: ContextCommands;
  /** The command being run, the response, and the tables as the command changes them. */
  private readonly cmd = new Uint8Array(MAX_RESPONSE);
  private readonly cmdView = new DataView(this.cmd.buffer);
  private readonly rsp = new Uint8Array(MAX_RESPONSE);
  private readonly rspView = new DataView(this.rsp.buffer);
  private readonly work: ContextTable;
  private locality = 0;
  private nextSpace = 1;
  /** The resource manager's own commands go the client's way, at its locality. */
  private readonly send = (c: Uint8Array): Uint8Array => this.transport.transmitSync(c, this.locality);
  readonly spaces = new Map<number, Space>();

  constructor(
    private readonly transport: SyncTransport,
    o: ResourceManagerOptions = {},
  ) {
    this.work = new ContextTable(o.spaceBufferSize);
    this.ctx = new ContextCommands(this.send);
  }

  /** A resource manager for `transport` if the TPM behind it is a TPM 2.0 (null for a
   *  TPM 1.2, which has no tpmrm0). The command table is read now; a TPM that cannot list
   *  it yet (not started up) gets another try at each tpmrm0 command. */
  static detect(transport: SyncTransport, o: ResourceManagerOptions = {}): ResourceManager | null {
    const rm = new ResourceManager(transport, o);
    try {
      rm.attributes.load(rm.send);
    } catch (e) {
      if (e instanceof VtpmError && e.code === 'EPROTO') return null;
      throw e;
    }
    return rm;
  }

  openSpace(): Space {
    const s = new Space(this.nextSpace++);
    this.spaces.set(s.id, s);
    return s;
  }

  /** Flush what the space holds in the TPM (its saved sessions) and forget it. A transport
   *  failure is thrown after the space is forgotten. */
  closeSpace(space: Space): void {
    if (space.closed) return;
    space.closed = true;
    this.spaces.delete(space.id);
    const t = space.table;
    for (let i = 0; i < t.sessions.length; i++) if (t.sessions[i] !== 0) this.ctx.flush(t.sessions[i]!);
  }

  /** Run one client command in `space`. Returns the response (a view of our buffer, valid
   *  until the next call) or -errno for the write, as the kernel's tpm_dev_transmit.
   *  Transport failures throw (VtpmError), after a best-effort flush of what was loaded. */
  execute(space: Space, command: Uint8Array, locality = 0): Uint8Array | number {
    if (space.closed) throw new VtpmError('ECLOSED', 'space is closed');
    if (command.length < TPM_HEADER_SIZE || command.length > this.cmd.length) return -ERRNO.EINVAL;
    this.locality = locality;
    if (this.attributes.size === 0 && this.attributes.load(this.send) !== 0) return -ERRNO.EINVAL;
    this.cmd.set(command);
    const len = command.length;
    const cc = this.cmdView.getUint32(6);
    const attrs = this.attributes.lookup(cc);
    if (attrs < 0) return this.synthesize(TPM_RC_COMMAND_CODE | TSS2_RESMGR_TPM_RC_LAYER);
    const nHandles = CommandAttributes.handles(attrs);
    if (len < TPM_HEADER_SIZE + 4 * nHandles) return -ERRNO.EINVAL;

    const w = this.work;
    w.objects.set(space.table.objects);
    w.sessions.set(space.table.sessions);
    w.objectBytes = 0;
    w.sessionBytes = 0;
    try {
      let errno = this.loadSpace(space.table);
      if (errno === 0) errno = this.mapCommand(nHandles);
      if (errno !== 0) {
        this.flushWork();
        return -errno;
      }
      const raw = this.transport.transmitSync(this.cmd.subarray(0, len), locality);
      if (raw.length < TPM_HEADER_SIZE || raw.length > this.rsp.length) {
        this.flushWork();
        throw new VtpmError('EIO', `TPM response of ${raw.length} bytes`);
      }
      this.rsp.set(raw);
      let rspLen = raw.length;
      errno = this.mapResponseHandle(attrs, rspLen);
      if (errno === 0 && cc === TPM_CC_GET_CAPABILITY) {
        const n = this.mapCapabilityHandles(rspLen);
        if (n < 0) errno = -n;
        else rspLen = n;
      }
      if (errno === 0) errno = this.saveSpace();
      if (errno !== 0) {
        this.flushWork();
        return -errno;
      }
    } catch (e) {
      this.flushWorkQuietly();
      throw e;
    }
    space.table.copyFrom(w);
    return this.rsp.subarray(0, this.rspView.getUint32(2));
  }

  /** The kernel's answer for a command the TPM does not implement: a bare header. */
  private synthesize(rc: number): Uint8Array {
    this.rspView.setUint16(0, TPM_ST_NO_SESSIONS);
    this.rspView.setUint32(2, TPM_HEADER_SIZE);
    this.rspView.setUint32(6, rc);
    return this.rsp.subarray(0, TPM_HEADER_SIZE);
  }

  /** ContextLoad the space's objects and sessions into the work tables; 0 or an errno. */
  private loadSpace(saved: ContextTable): number {
    const w = this.work;
    for (let i = 0, at = 0; i < w.objects.length; i++) {
      if (w.objects[i] === 0) continue;
      if (w.objects[i] !== SAVED) return ERRNO.EFAULT; // table inconsistent: never happens
      const size = ContextCommands.contextSize(saved.objectBuf, at, saved.objectBytes);
      const h = size < 0 ? -ERRNO.EFAULT : this.ctx.load(saved.objectBuf, at, size);
      if (h < 0) {
        w.objects[i] = 0; // nothing loaded for this slot: not flushed
        return -h;
      }
      w.objects[i] = h;
      at += size;
    }
    for (let i = 0, at = 0; i < w.sessions.length; i++) {
      if (w.sessions[i] === 0) continue;
      const size = ContextCommands.contextSize(saved.sessionBuf, at, saved.sessionBytes);
      const h = size < 0 ? -ERRNO.EFAULT : this.ctx.load(saved.sessionBuf, at, size);
      if (size > 0) at += size;
      if (h === -ERRNO.ENOENT) {
        w.sessions[i] = 0; // gone (flushed elsewhere, or a replayed context): forget it
        continue;
      }
      if (h < 0) return -h;
      if (h !== w.sessions[i]) return ERRNO.EFAULT; // restored to another handle
    }
    return 0;
  }

  /** Virtual → TPM handles in the command's handle area; EINVAL for one not in the space. */
  private mapCommand(nHandles: number): number {
    const v = this.cmdView;
    for (let i = 0, at = TPM_HEADER_SIZE; i < nHandles; i++, at += 4) {
      const h = v.getUint32(at);
      if (((h & HT_MASK) >>> 0) !== HT_TRANSIENT) continue;
      const slot = slotOf(h);
      if (slot >= SPACE_OBJECTS || this.work.objects[slot] === 0) return ERRNO.EINVAL;
      v.setUint32(at, this.work.objects[slot]!);
    }
    return 0;
  }

  /** A handle the command created: give it a slot (and the client its virtual handle). */
  private mapResponseHandle(attrs: number, len: number): number {
    const v = this.rspView;
    if (v.getUint32(6) !== 0 || !CommandAttributes.returnsHandle(attrs)) return 0;
    if (len < TPM_HEADER_SIZE + 4) return ERRNO.EFAULT;
    const h = v.getUint32(TPM_HEADER_SIZE);
    const type = (h & HT_MASK) >>> 0;
    const table = type === HT_TRANSIENT ? this.work.objects : type === HT_HMAC_SESSION || type === HT_POLICY_SESSION ? this.work.sessions : null;
    if (!table) return 0; // the kernel logs an unknown handle type and passes it through
    const slot = table.indexOf(0);
    if (slot < 0) {
      this.ctx.flush(h);
      return ERRNO.ENOMEM; // out of slots
    }
    table[slot] = h;
    if (table === this.work.objects) v.setUint32(TPM_HEADER_SIZE, virtualHandle(slot));
    return 0;
  }

  /** GetCapability(TPM_CAP_HANDLES): keep only this space's transient objects, renamed.
   *  Returns the new response length, or -errno. */
  private mapCapabilityHandles(len: number): number {
    const v = this.rspView;
    if (v.getUint32(6) !== 0) return len;
    const body = TPM_HEADER_SIZE + 9; // moreData, capability, count
    if (len < body) return -ERRNO.EFAULT;
    if (v.getUint32(TPM_HEADER_SIZE + 1) !== TPM_CAP_HANDLES) return len;
    const count = v.getUint32(TPM_HEADER_SIZE + 5);
    if (count > (len - body) / 4 || len !== body + 4 * count) return -ERRNO.EFAULT;
    let kept = 0;
    for (let i = 0; i < count; i++) {
      let h = v.getUint32(body + 4 * i);
      if (((h & HT_MASK) >>> 0) === HT_TRANSIENT) {
        const slot = this.work.objects.indexOf(h);
        if (slot < 0) continue; // not this space's: invisible here
        h = virtualHandle(slot);
      }
      v.setUint32(body + 4 * kept++, h);
    }
    v.setUint32(TPM_HEADER_SIZE + 5, kept);
    v.setUint32(2, body + 4 * kept);
    return body + 4 * kept;
  }

  /** ContextSave + FlushContext every loaded object, ContextSave every session. */
  private saveSpace(): number {
    const w = this.work;
    const cap = w.objectBuf.length;
    for (let i = 0; i < w.objects.length; i++) {
      const h = w.objects[i]!;
      if (h === 0 || h === SAVED) continue;
      const n = this.ctx.save(h, w.objectBuf, w.objectBytes, cap);
      if (n === -ERRNO.ENOENT) {
        w.objects[i] = 0; // flushed by the command (FlushContext of its own handle)
        continue;
      }
      if (n < 0) return -n;
      w.objectBytes += n;
      this.ctx.flush(h);
      w.objects[i] = SAVED;
    }
    for (let i = 0; i < w.sessions.length; i++) {
      const h = w.sessions[i]!;
      if (h === 0) continue;
      const n = this.ctx.save(h, w.sessionBuf, w.sessionBytes, w.sessionBuf.length);
      if (n === -ERRNO.ENOENT) {
        w.sessions[i] = 0; // ended by the command (continueSession clear, or flushed)
        continue;
      }
      if (n < 0) return -n;
      w.sessionBytes += n;
    }
    return 0;
  }

  /** The kernel's tpm2_flush_space: flush the loaded objects and the sessions of the work
   *  tables (a failed command loses its space's sessions, as on Linux). */
  private flushWork(): void {
    const w = this.work;
    for (let i = 0; i < w.objects.length; i++) {
      const h = w.objects[i]!;
      if (h !== 0 && h !== SAVED) this.ctx.flush(h);
    }
    for (let i = 0; i < w.sessions.length; i++) if (w.sessions[i] !== 0) this.ctx.flush(w.sessions[i]!);
  }

  private flushWorkQuietly(): void {
    try {
      this.flushWork();
    } catch {
      // the transport already failed; the caller reports that failure
    }
  }
}
