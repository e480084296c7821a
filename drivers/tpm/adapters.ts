// Adapters between the seams, so every TPM is usable wherever a transport is wanted:
//   Engine        → SyncTransport   engineTransport (the engine runs on the caller's thread)
//   SyncTransport → TpmTransport    blockingTransport (the caller's thread blocks per command;
//                                   a HardwareTpm, so the manager's client can use it too)
// The other crossings live beside their machinery: RmThread (drivers/tpmrm: a SyncTransport in a
// worker, as a TpmTransport) and SocketTransport (a TPM on a socket, as a TpmTransport).
import { VtpmError } from '../base/errors.ts';
import { TPM_MAX_COMMAND_SIZE } from './command.ts';
import type { Engine } from './engine.ts';
import type { HardwareTpm, SyncTransport } from './transport.ts';

export interface EngineTransportOptions {
  /** Called once by close() (default: engine.terminate()). */
  onClose?: () => void;
}

/** An Engine as a SyncTransport. The response is a view into one buffer reused for every
 *  command (valid until the next call, as SyncTransport allows): no allocation per command
 *  when the engine has processInto. */
export function engineTransport(engine: Engine, o: EngineTransportOptions = {}): SyncTransport {
  const out = new Uint8Array(TPM_MAX_COMMAND_SIZE);
  let closed = false;
  return {
    transmitSync(cmd, locality) {
      if (closed) throw new VtpmError('ECLOSED', 'engine transport is closed');
      if (engine.processInto) return out.subarray(0, engine.processInto(cmd, out, locality));
      return engine.process(cmd, locality);
    },
    close() {
      if (closed) return;
      closed = true;
      (o.onClose ?? (() => engine.terminate()))();
    },
  };
}

/** A SyncTransport as a TpmTransport on the calling thread: each command blocks this thread
 *  until it is done. For callers that have nothing else to serve meanwhile (the manager's
 *  own in-process TPM, tests, CLI one-shots); anything serving others runs its backend in a worker (drivers/tpmrm/rm-thread.ts). */
export function blockingTransport(sync: SyncTransport, description = 'a TPM on this thread'): HardwareTpm {
  return {
    description,
    async transmit(command, locality = 0) {
      // slice: the transport may hand out a view of a buffer it reuses
      return sync.transmitSync(command, locality).slice();
    },
    async close() {
      sync.close();
    },
  };
}
