// tpm0's commands through the backend, for a front end serving on the backend's own thread
// (the raw FUSE server): the tpm-dev core's rules, then the backend. With a split backend
// (vtpmd over tpmif: begin/finish) the WRITE is answered first and the command handed over
// after; the file's next READ (or a tpmrm0 command needing the backend) collects the
// response. Otherwise the command runs whole before the WRITE is answered. A backend
// failure is the client's EIO, its cause reported through onBackendError.
import type { SyncTransport } from '../tpm/transport.ts';
import type { TpmDevCore } from './tpmdev.ts';

export class Tpm0Commands {
  /** File whose command a split backend is running (0: none). */
  private inFlight = 0;
  private beginFailed = false;
  /** A command collected early (for a tpmrm0 command) that failed: its file's next READ
   *  gets the errno, as it would have had the READ collected it. */
  private deferredFh = 0;
  private deferredErrno = 0;
  private readonly split: boolean;

  constructor(
    private readonly core: TpmDevCore,
    private readonly backend: SyncTransport,
    private readonly locality: number,
    private readonly onBackendError?: (e: unknown) => void,
  ) {
    this.split = typeof backend.begin === 'function' && typeof backend.finish === 'function';
  }

  /** A WRITE of `data` by file `fh`: an errno (> 0) to answer it with, or 0 once `answer()`
   *  has been called (the write succeeded). */
  write(fh: number, data: Uint8Array, answer: () => void): number {
    const start = this.core.startWrite(fh, data);
    if ('errno' in start) return start.errno;
    if (this.split) {
      // Answer the write first, then hand the command over. In this order the client turns
      // round to read while vtpmd runs the command (woken on this CPU, it would preempt us
      // before the reply); the READ then finds the response, or waits.
      if (this.inFlight !== 0) this.settle(); // a released file's command: finish, drop
      answer();
      this.inFlight = fh;
      try {
        this.backend.begin!(start.command, this.locality);
        this.beginFailed = false;
      } catch (e) {
        this.beginFailed = true; // the read gets EIO
        this.onBackendError?.(e);
      }
      return 0;
    }
    let rsp: Uint8Array;
    try {
      rsp = this.backend.transmitSync(start.command, this.locality);
    } catch (e) {
      // Backend failure (typed VtpmError: timeout, peer gone): the client sees EIO.
      this.onBackendError?.(e);
      return -this.core.fail(fh);
    }
    const res = this.core.complete(fh, data.length, rsp);
    if (res < 0) return -res;
    answer();
    return 0;
  }

  /** Before a READ by `fh`: collect its command in flight. The errno the READ gets (its
   *  command failed), or 0 to read what the core holds. */
  beforeRead(fh: number): number {
    if (this.inFlight === fh && fh !== 0) return this.settle();
    if (this.deferredFh === fh && fh !== 0) {
      this.deferredFh = 0;
      return this.deferredErrno;
    }
    return 0;
  }

  released(fh: number): void {
    if (this.deferredFh === fh) this.deferredFh = 0;
  }

  /** Before something else uses the backend (a tpmrm0 command): finish the command in
   *  flight, if any, keeping a failure for its file's READ. */
  collect(): void {
    if (this.inFlight === 0) return;
    const fh = this.inFlight;
    const errno = this.settle();
    if (errno !== 0) {
      this.deferredFh = fh;
      this.deferredErrno = errno;
    }
  }

  /** Wait for the split backend's response to the command in flight and hand it to the core
   *  (a failure makes the file's next read EIO). Returns the errno for the reader, or 0. */
  private settle(): number {
    const fh = this.inFlight;
    this.inFlight = 0;
    let rsp: Uint8Array;
    try {
      if (this.beginFailed) return -this.core.fail(fh);
      rsp = this.backend.finish!();
    } catch (e) {
      this.onBackendError?.(e);
      return -this.core.fail(fh);
    }
    const res = this.core.complete(fh, 0, rsp);
    return res < 0 ? -res : 0;
  }
}
