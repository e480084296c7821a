// The seam between a tpm0 front end and whatever runs the TPM commands.
//
// The raw FUSE front end serves from a worker thread and must construct its backend INSIDE
// that worker (a futex-waiting tpmif front, a libtpms engine: neither can cross threads).
// So a backend is named by a serialisable spec: the worker `import()`s `module` and calls
// its export `export` with `params`, which returns (or resolves to) a SyncBackend.
//
//   const spec: BackendSpec = {
//     module: '/abs/path/drivers/tpmfront/backend-engine.ts', export: 'createEngineBackend',
//     params: { version: '2.0' },
//   };
//
// The real guest backend (tpmif shared page + futex event channel to vtpmd) plugs in the
// same way: a module whose factory takes TpmifParams, attaches TpmifFront and answers
// transmitSync with front.sendSync(cmd, locality, timeoutMs). Every backend wait must have
// a timeout: a backend that throws makes the client's write fail with EIO, never hang.

import { pathToFileURL } from 'node:url';
import { isAbsolute } from 'node:path';
import { VtpmError } from '../base/errors.ts';

export interface BackendSpec {
  /** Absolute path of a .ts/.js module. */
  module: string;
  /** Name of the factory it exports: (params) => SyncBackend | Promise<SyncBackend>. */
  export: string;
  /** Structured-cloneable parameters for the factory. */
  params: unknown;
}

/** A blocking backend, for use on a thread that does nothing else while it waits. */
export interface SyncBackend {
  /** Run one whole command; returns the whole response. The bytes may be a view into a
   *  buffer the backend reuses: valid until the next transmitSync. Throws VtpmError on
   *  backend failure (timeout, peer gone). */
  transmitSync(cmd: Uint8Array, locality: number): Uint8Array;
  /** Optional split form of transmitSync, for a backend that runs elsewhere (vtpmd): begin
   *  starts the command and returns at once; finish blocks for its response (same errors and
   *  bounds as transmitSync). The front end answers the client's write in between, so the
   *  command runs while the client turns round to read. */
  begin?(cmd: Uint8Array, locality: number): void;
  /** The response may be a view into a buffer the backend reuses: valid until the next finish. */
  finish?(): Uint8Array;
  /** Release what the backend holds (engine, mappings). */
  close(): void;
}

export type BackendFactory = (params: unknown) => SyncBackend | Promise<SyncBackend>;

export function checkSpec(spec: unknown): BackendSpec {
  const s = spec as BackendSpec;
  if (!s || typeof s !== 'object' || typeof s.module !== 'string' || typeof s.export !== 'string') {
    throw new VtpmError('EINVAL', 'backend spec must be { module: string, export: string, params }');
  }
  if (!isAbsolute(s.module)) throw new VtpmError('EINVAL', `backend module ${s.module} is not an absolute path`);
  return s;
}

/** Import the spec's module and build the backend (call this inside the thread that uses it). */
export async function loadBackend(spec: BackendSpec): Promise<SyncBackend> {
  checkSpec(spec);
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(spec.module).href)) as Record<string, unknown>;
  } catch (e) {
    throw new VtpmError('EINVAL', `cannot import backend module ${spec.module}`, { cause: e });
  }
  const factory = mod[spec.export];
  if (typeof factory !== 'function') throw new VtpmError('EINVAL', `${spec.module} has no function export ${spec.export}`);
  const b = (await (factory as BackendFactory)(spec.params)) as SyncBackend;
  if (!b || typeof b.transmitSync !== 'function' || typeof b.close !== 'function') {
    throw new VtpmError('EINVAL', `${spec.module}:${spec.export} did not return a SyncBackend`);
  }
  return b;
}
