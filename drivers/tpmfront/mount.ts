// One entry point to mount a guest's tpm0, whichever front end serves it.
//   const node = await mountTpmNode({ dir, frontEnd: 'raw', backend: engineBackendSpec({ version: '2.0' }) })
//   ... clients use node.path (DIR/tpm0), and node.rmPath (DIR/tpmrm0) for a TPM 2.0 ...
//   await node.close()
// 'raw' (default): the FUSE protocol in a worker thread that also runs the backend (root).
// 'native': fuse-native on the main thread; the backend runs in its own worker thread.
// Both unmount on close(), on process exit, and (unless handleSignals is false) on
// SIGTERM/SIGINT, then exit. A backend failure fails the client's write with EIO.
// tpmrm0 (Linux' resource-managed node, drivers/tpmrm) sits beside tpm0 when the backend
// answers as a TPM 2.0, unless tpmrm is false.
import { VtpmError } from '../base/errors.ts';
import type { TpmTransport } from '../tpm/transport.ts';
import type { TransportSpec } from '../tpm/transport.ts';
import { mountNative } from './fuse-native.ts';
import { mountRaw, type TpmNode } from './fuse-raw.ts';

export type { TransportSpec, SyncTransport } from '../tpm/transport.ts';
export type { TpmNode } from './fuse-raw.ts';
export type FrontEnd = 'raw' | 'native';

export interface MountTpmNodeOptions {
  /** Directory to mount on (created 0700; a stale mount there is cleared). */
  dir: string;
  frontEnd?: FrontEnd;
  /** Where commands go. 'native' also accepts a TpmTransport already running elsewhere. */
  backend: TransportSpec | TpmTransport;
  /** Wait for a pending RELEASE before answering EBUSY to a second opener (ms, default 250). */
  graceMs?: number;
  /** Drop an unread response after this long (ms, default 120 000 as Linux). */
  responseTimeoutMs?: number;
  handleSignals?: boolean;
  /** Serve tpmrm0 beside tpm0 when the backend is a TPM 2.0 (default true). */
  tpmrm?: boolean;
}

export async function mountTpmNode(o: MountTpmNodeOptions): Promise<TpmNode> {
  const frontEnd = o.frontEnd ?? 'raw';
  if (frontEnd === 'native') return mountNative(o);
  if (frontEnd !== 'raw') throw new VtpmError('EINVAL', `unknown FUSE front end ${String(frontEnd)} (raw | native)`);
  if (typeof (o.backend as TpmTransport).transmit === 'function') {
    throw new VtpmError('EINVAL', 'the raw front end builds its backend inside its worker: pass a TransportSpec, not a transport');
  }
  return mountRaw({ ...o, backend: o.backend as TransportSpec });
}
