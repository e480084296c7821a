// fuse-native front end (`--fuse native`): the same tpm0 through libfuse 2, whose handlers
// run on this (main) JavaScript thread. Slower than the raw front end (every operation hops
// threads twice) but needs no mount(2) privilege of our own. The TPM itself never runs
// here: the backend is a TpmTransport (an RmThread for a spec, or the caller's own).
// fuse-native specifics (REFERENCE.md; the binding and direct_io in fuse-native-binding.ts):
// the write buffer is reused (copied), handle 0 means "none" (the core starts at 1), no
// poll (the write completes with its response), no ioctl hook (libfuse answers ENOSYS,
// which the kernel turns into ENOTTY for the client).
// tpmrm0: for a backend given as a spec, the backend runs in an RmThread (drivers/tpmrm),
// which also hosts the resource manager when the TPM is a 2.0; every tpmrm0 file is a
// space there, its commands run whole in the write (Linux' blocking mode). A backend given
// as a TpmTransport already running elsewhere gets no tpmrm0: the resource manager must sit
// on the thread that owns the TPM, so its sequence of commands cannot interleave.
import { join } from 'node:path';
import { VtpmError } from '../base/errors.ts';
import type { TpmTransport, TransportSpec } from '../tpm/transport.ts';
import { RmThread } from '../tpmrm/rm-thread.ts';
import type { TpmNode } from './fuse-raw.ts';
import { NODE_NAME, RM_NODE_NAME } from './fuse-serve.ts';
import { backendErrorReporter } from './backend-error.ts';
import { directIoFuse, fuseNativeUnmount, type FuseCb } from './fuse-native-binding.ts';
import { detach, prepareMountpoint, trackMount, untrackMount } from './mountpoint.ts';
import { EBADF, EBUSY, EINTR, EIO, TpmDevCore } from './tpmdev.ts';

type Cb = FuseCb;

const ENOENT = 2;
const ENODEV = 19;
const EISDIR = 21;

export interface NativeMountOptions {
  dir: string;
  backend: TransportSpec | TpmTransport;
  graceMs?: number;
  responseTimeoutMs?: number;
  handleSignals?: boolean;
  /** Serve tpmrm0 beside tpm0 when the backend (a spec) is a TPM 2.0 (default true). */
  tpmrm?: boolean;
}

export async function mountNative(o: NativeMountOptions): Promise<TpmNode> {
  prepareMountpoint(o.dir);
  const ownsTransport = !isTransport(o.backend);
  const rmThread = isTransport(o.backend) ? null : await RmThread.start(o.backend, { tpmrm: o.tpmrm ?? true });
  const transport: TpmTransport = rmThread ?? (o.backend as TpmTransport);
  const spaces = rmThread?.tpmrm ? new Map<number, number>() : null; // tpmrm0 file → its space
  const core = new TpmDevCore({ graceMs: o.graceMs, responseTimeoutMs: o.responseTimeoutMs });
  const rmCore = new TpmDevCore({ shared: true, responseTimeoutMs: o.responseTimeoutMs });
  const RM = `/${RM_NODE_NAME}`;
  const reportBackendError = backendErrorReporter();
  // OPENs waiting for the previous opener's RELEASE (the kernel sends it asynchronously).
  const waiting: { cb: Cb; timer: NodeJS.Timeout }[] = [];
  const admit = () => {
    while (waiting.length > 0) {
      const h = core.open();
      if (h < 0) return;
      const w = waiting.shift()!;
      clearTimeout(w.timer);
      w.cb(0, h);
    }
  };
  let closed = false;
  const now = new Date();
  const stat = (dir: boolean) => ({
    mtime: now,
    atime: now,
    ctime: now,
    size: 0,
    uid: 0,
    gid: 0,
    mode: dir ? 0o40700 : 0o100600,
    nlink: dir ? 2 : 1,
  });
  const ops = {
    getattr: (p: string, cb: Cb) => (p === '/' ? cb(0, stat(true)) : p === `/${NODE_NAME}` || (p === RM && spaces) ? cb(0, stat(false)) : cb(-ENOENT)),
    readdir: (p: string, cb: Cb) => (p === '/' ? cb(0, spaces ? [NODE_NAME, RM_NODE_NAME] : [NODE_NAME]) : cb(-ENOENT)),
    open: (p: string, _flags: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
      if (p === '/') return cb(-EISDIR);
      if (p === RM && spaces && rmThread) {
        const h = rmCore.open();
        rmThread.openSpace().then(
          (s) => {
            spaces.set(h, s);
            cb(0, h);
          },
          (e: unknown) => {
            rmCore.release(h);
            reportBackendError(e);
            cb(-EIO);
          },
        );
        return;
      }
      if (p !== `/${NODE_NAME}`) return cb(-ENOENT);
      const h = core.open();
      if (h > 0) return cb(0, h);
      const entry = {
        cb,
        timer: setTimeout(() => {
          waiting.splice(waiting.indexOf(entry), 1);
          cb(-EBUSY);
        }, core.graceMs),
      };
      waiting.push(entry);
    },
    release: (p: string, fd: number, cb: Cb) => {
      if (p === RM && spaces && rmThread) {
        rmCore.release(fd);
        const s = spaces.get(fd);
        spaces.delete(fd);
        if (s === undefined) return cb(0);
        // the space is flushed before the RELEASE is answered
        rmThread.closeSpace(s).then(
          () => cb(0),
          (e: unknown) => {
            reportBackendError(e);
            cb(0);
          },
        );
        return;
      }
      core.release(fd);
      cb(0);
      admit();
    },
    flush: (_p: string, _fd: number, cb: Cb) => cb(0),
    truncate: (_p: string, _size: number, cb: Cb) => cb(0),
    ftruncate: (_p: string, _fd: number, _size: number, cb: Cb) => cb(0),
    write: (p: string, fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
      if (p === RM && spaces && rmThread) {
        const start = rmCore.startWrite(fd, Uint8Array.prototype.slice.call(buf, 0, len)); // copy: buf is reused
        if ('errno' in start) return cb(-start.errno);
        const s = spaces.get(fd);
        if (s === undefined) return cb(rmCore.fail(fd, EBADF));
        rmThread.execute(s, start.command).then(
          (r) => cb(typeof r === 'number' ? rmCore.fail(fd, -r) : rmCore.complete(fd, len, r)),
          (e: unknown) => {
            reportBackendError(e);
            cb(rmCore.fail(fd));
          },
        );
        return;
      }
      const start = core.startWrite(fd, Uint8Array.prototype.slice.call(buf, 0, len)); // copy: buf is reused
      if ('errno' in start) return cb(-start.errno);
      transport.transmit(start.command).then(
        (rsp) => cb(core.complete(fd, len, rsp)),
        (e: unknown) => {
          reportBackendError(e);
          cb(core.fail(fd));
        },
      );
    },
    read: (p: string, fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
      const got = (p === RM && spaces ? rmCore : core).read(fd, len);
      if (typeof got === 'number') return cb(got);
      buf.set(got);
      cb(got.length);
    },
  };
  const fuse = directIoFuse(o.dir, ops);
  try {
    await new Promise<void>((resolve, reject) => fuse.mount((e) => (e ? reject(e) : resolve())));
  } catch (e) {
    if (ownsTransport) await transport.close();
    throw new VtpmError('EIO', `fuse-native mount at ${o.dir} failed: ${(e as Error).message}`, { cause: e });
  }
  let resolveEnded!: () => void;
  const ended = new Promise<void>((r) => (resolveEnded = r));
  let closing: Promise<void> | null = null;
  const close = (): Promise<void> =>
    (closing ??= (async () => {
      for (const w of waiting.splice(0)) {
        clearTimeout(w.timer);
        w.cb(-EINTR);
      }
      // fuse-native's unmount (fusermount -uz, then a native call that never closes libfuse's
      // fd) hung here while a client held tpm0. Instead: answer ENODEV to every later
      // operation and detach the mount ourselves; the kernel ends libfuse's loop once the
      // last client closes (or at process exit).
      closed = true;
      detach(o.dir);
      fuseNativeUnmount(o.dir, fuse);
      if (ownsTransport) await transport.close();
      untrackMount(o.dir);
      resolveEnded();
    })());
  trackMount(o.dir, close, o.handleSignals ?? true);
  return { path: join(o.dir, NODE_NAME), rmPath: spaces ? join(o.dir, RM_NODE_NAME) : undefined, dir: o.dir, frontEnd: 'native', ended, close };
}

function isTransport(b: TransportSpec | TpmTransport): b is TpmTransport {
  return typeof (b as TpmTransport).transmit === 'function';
}
