// tpmrm0's open files, for a front end that serves on the backend's own thread (the raw
// FUSE loop): any number of openers, each file a space of the resource manager
// (drivers/tpmrm), and a command runs whole — the space's loads, the command, its saves —
// before the write returns, so the next read finds the response.
import type { ResourceManager } from '../tpmrm/resource-manager.ts';
import type { Space } from '../tpmrm/space.ts';
import { EBADF, TpmDevCore } from './tpmdev.ts';

export class RmFiles {
  /** tpm-dev rules for tpmrm0: shared (never busy), one command at a time per file. */
  readonly core: TpmDevCore;
  private readonly spaces = new Map<number, Space>();

  constructor(
    private readonly rm: ResourceManager,
    responseTimeoutMs: number,
    private readonly onBackendError?: (e: unknown) => void,
  ) {
    this.core = new TpmDevCore({ shared: true, responseTimeoutMs });
  }

  /** A new file with a space of its own; its handle. */
  open(): number {
    const fh = this.core.open();
    this.spaces.set(fh, this.rm.openSpace());
    return fh;
  }

  /** One whole command for file `fh`: bytes written, or -errno (tpm-dev's refusals, the
   *  resource manager's, EIO when the backend failed). `beforeBackend` runs just before the
   *  backend is used (the caller finishes a tpm0 command still in flight there). */
  write(fh: number, data: Uint8Array, locality: number, beforeBackend: () => void): number {
    const start = this.core.startWrite(fh, data);
    if ('errno' in start) return -start.errno;
    const space = this.spaces.get(fh);
    if (!space) return this.core.fail(fh, EBADF);
    beforeBackend();
    let rsp: Uint8Array | number;
    try {
      rsp = this.rm.execute(space, start.command, locality);
    } catch (e) {
      this.onBackendError?.(e);
      return this.core.fail(fh);
    }
    if (typeof rsp === 'number') return this.core.fail(fh, -rsp);
    return this.core.complete(fh, data.length, rsp);
  }

  /** Closing a file flushes what its space holds. */
  release(fh: number, beforeBackend: () => void): void {
    this.core.release(fh);
    const space = this.spaces.get(fh);
    this.spaces.delete(fh);
    if (!space) return;
    beforeBackend();
    try {
      this.rm.closeSpace(space);
    } catch (e) {
      this.onBackendError?.(e);
    }
  }
}
