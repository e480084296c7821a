// The transport seams, in the manner of Linux's tpm_class_ops and tpm2-tss' TCTI: one
// asynchronous form for event-loop callers (TpmTransport), one synchronous form for a thread
// that does nothing else while it waits (SyncTransport). What implements what:
//   TpmTransport   TisDriver (tpm_tis), TpmDevice (tpm_dev), SocketTransport (a TPM on a
//                  socket, e.g. swtpm), RmThread (drivers/tpmrm: a SyncTransport and its resource manager in a worker),
//                  blockingTransport(sync) (a SyncTransport on the calling thread)
//   SyncTransport  engineTransport(engine) (an Engine, e.g. libtpms' engine-backend), the
//                  tpmif front end (drivers/tpmfront), anything a TransportSpec names
// An Engine (engine.ts) is the TPM itself, below both.
import { type FactorySpec, checkFactorySpec, loadFactory } from '../base/modules.ts';

/** Anything that takes one whole TPM command and gives back one whole response, for a
 *  caller on an event loop. */
export interface TpmTransport {
  /** Send one command; resolves with the whole response. Failures below the TPM reject
   *  with a VtpmError (callers at the guest edge turn that into TPM_FAIL or EIO). */
  transmit(command: Uint8Array, locality?: number): Promise<Uint8Array>;
  /** Ask the TPM to abandon the command in flight, if any (best effort). */
  cancel?(): Promise<void>;
  close(): Promise<void>;
}

/** A blocking transport, for use on a thread that does nothing else while it waits (the
 *  raw FUSE worker, an engine or chip thread). */
export interface SyncTransport {
  /** Run one whole command; returns the whole response. The bytes may be a view into a
   *  buffer the transport reuses: valid until the next call. Throws VtpmError on failure
   *  below the TPM (timeout, peer gone); every wait is bounded. */
  transmitSync(cmd: Uint8Array, locality: number): Uint8Array;
  /** Optional split form of transmitSync, for a transport whose TPM runs elsewhere
   *  (vtpmd): begin starts the command and returns at once; finish blocks for its response
   *  (same errors and bounds). The caller works in between (the raw front end answers the
   *  client's write), so the command runs while the client turns round to read. */
  begin?(cmd: Uint8Array, locality: number): void;
  /** The response may be a view into a buffer the transport reuses: valid until the next finish. */
  finish?(): Uint8Array;
  /** Release what the transport holds (engine, mappings). */
  close(): void;
}

/** A SyncTransport named by a spec, built inside the thread that uses it. */
export type TransportSpec = FactorySpec;
export const checkTransportSpec = checkFactorySpec;

/** Errors say "backend": the transport is the backend of whoever loads it (a front end, a chip). */
export function loadTransport(spec: TransportSpec): Promise<SyncTransport> {
  return loadFactory<SyncTransport>(spec, 'backend', (v) => {
    const t = v as SyncTransport;
    return !!t && typeof t.transmitSync === 'function' && typeof t.close === 'function';
  });
}

/** The host's hardware TPM as the manager sees it (TIS model or a real device). */
export interface HardwareTpm extends TpmTransport {
  readonly description: string;
}
