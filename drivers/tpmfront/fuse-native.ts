// fuse-native front end (`--fuse native`): the same tpm0 through libfuse 2, whose handlers
// run on this (main) JavaScript thread. Slower than the raw front end (every operation hops
// threads twice) but needs no mount(2) privilege of our own. The TPM itself never runs
// here: the backend is a TpmTransport (ThreadTransport for a spec, or the caller's own).
// fuse-native specifics (REFERENCE.md; the binding and direct_io in fuse-native-binding.ts):
// the write buffer is reused (copied), handle 0 means "none" (the core starts at 1), no
// poll (the write completes with its response), no ioctl hook (libfuse answers ENOSYS,
// which the kernel turns into ENOTTY for the client).
import { join } from 'node:path';
import { VtpmError } from '../base/errors.ts';
import type { TpmTransport, TransportSpec } from '../tpm/transport.ts';
import { ThreadTransport } from '../tpm/thread-transport.ts';
import type { TpmNode } from './fuse-raw.ts';
import { NODE_NAME } from './fuse-serve.ts';
import { backendErrorReporter } from './backend-error.ts';
import { directIoFuse, fuseNativeUnmount, type FuseCb } from './fuse-native-binding.ts';
import { detach, prepareMountpoint, trackMount, untrackMount } from './mountpoint.ts';
import { EBUSY, EINTR, TpmDevCore } from './tpmdev.ts';

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
}

export async function mountNative(o: NativeMountOptions): Promise<TpmNode> {
  prepareMountpoint(o.dir);
  const ownsTransport = !isTransport(o.backend);
  const transport: TpmTransport = isTransport(o.backend) ? o.backend : await ThreadTransport.start(o.backend);
  const core = new TpmDevCore({ graceMs: o.graceMs, responseTimeoutMs: o.responseTimeoutMs });
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
    getattr: (p: string, cb: Cb) => (p === '/' ? cb(0, stat(true)) : p === `/${NODE_NAME}` ? cb(0, stat(false)) : cb(-ENOENT)),
    readdir: (p: string, cb: Cb) => (p === '/' ? cb(0, [NODE_NAME]) : cb(-ENOENT)),
    open: (p: string, _flags: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
      if (p === '/') return cb(-EISDIR);
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
    release: (_p: string, fd: number, cb: Cb) => {
      core.release(fd);
      cb(0);
      admit();
    },
    flush: (_p: string, _fd: number, cb: Cb) => cb(0),
    truncate: (_p: string, _size: number, cb: Cb) => cb(0),
    ftruncate: (_p: string, _fd: number, _size: number, cb: Cb) => cb(0),
    write: (_p: string, fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
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
    read: (_p: string, fd: number, buf: Buffer, len: number, _pos: number, cb: Cb) => {
      if (closed) return cb(-ENODEV);
      const got = core.read(fd, len);
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
  return { path: join(o.dir, NODE_NAME), dir: o.dir, frontEnd: 'native', ended, close };
}

function isTransport(b: TransportSpec | TpmTransport): b is TpmTransport {
  return typeof (b as TpmTransport).transmit === 'function';
}
