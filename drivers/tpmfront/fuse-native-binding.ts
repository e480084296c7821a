// fuse-native as this project uses it, typed once: the constructor, the errno constants it
// carries, and a mount with direct I/O (fuse-native has no public option for it, so the
// option string it builds gets `direct_io` appended: tpm0 must never be served from the
// page cache). Used by the fuse-native front end and by the test and benchmark nodes.
import { createRequire } from 'node:module';

export type FuseCb = (result: number, ...rest: unknown[]) => void;
export type FuseOps = Record<string, (...a: never[]) => void>;

export interface FuseInstance {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
  _fuseOptions(): string;
}

interface FuseCtor {
  new (mnt: string, ops: FuseOps, opts: Record<string, unknown>): FuseInstance;
  EIO: number;
  ENOENT: number;
  EBUSY: number;
  EINVAL: number;
}

const require = createRequire(import.meta.url);
export const Fuse = require('fuse-native') as FuseCtor;

/** A fuse-native instance for `mnt` whose mount uses direct I/O. Per-operation timeouts
 *  are off (TPM key generation can take seconds). */
export function directIoFuse(mnt: string, ops: FuseOps, opts: Record<string, unknown> = {}): FuseInstance {
  const fuse = new Fuse(mnt, ops, { timeout: false, ...opts });
  const base = fuse._fuseOptions.bind(fuse);
  fuse._fuseOptions = () => {
    const s = base();
    return s ? `${s},direct_io` : '-odirect_io';
  };
  return fuse;
}

/** fuse-native's own native binding (the cached module it loads): its unmount call only
 *  releases the event-loop handle, which the front end needs without fusermount. */
export function fuseNativeUnmount(mnt: string, fuse: FuseInstance): void {
  const binding = require('node-gyp-build')(require.resolve('fuse-native').replace(/\/[^/]*$/, '')) as {
    fuse_native_unmount(mnt: string, thread: unknown): void;
  };
  binding.fuse_native_unmount(mnt, (fuse as unknown as { _thread: unknown })._thread);
}
