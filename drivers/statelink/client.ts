// vtpmd's end of the state link: a StateStore whose blobs live in the manager, reached
// through a tpmif front end (or any SyncTransport). Synchronous, as libtpms' NVRAM
// callbacks are: each call loops over the chunks (protocol.ts) on the calling thread.
//
//   const store = new LinkStateStore(TpmifFront.attach(params, { timeoutMs }), uuid)
//
// Every failure — the transport's (ETIMEDOUT, ECLOSED, EIO), the server's error reply
// (its code and causes, errorFromWire), a reply that breaks the protocol (EPROTO) — is
// thrown as VtpmError ESTATE with that failure as its cause, so the engine fails the
// command rather than acknowledge state that was not saved. store() returns only once
// the server answered the last chunk with `stored: true` (it committed the whole blob).
import { errorFromWire, VtpmError } from '../base/errors.ts';
import type { StateStore } from '../tpm/engine.ts';
import type { SyncTransport } from '../tpm/transport.ts';
import { BLOB_NAME, CHUNK, decodeReply, encodeRequest, MAX_BLOB, type StateOp, type StateRequest } from './protocol.ts';

/** The locality state-link requests are sent at (the link carries no TPM commands). */
const LOCALITY = 0;

export class LinkStateStore implements StateStore {
  constructor(
    private readonly transport: SyncTransport,
    readonly uuid: string,
  ) {}

  load(name: string): Uint8Array | undefined {
    return this.guard('load', name, () => {
      let r = this.exchange({ op: 'load', uuid: this.uuid, name, offset: 0 });
      if (!r.found) return undefined;
      const out = new Uint8Array(r.total);
      let off = 0;
      for (;;) {
        if (r.total !== out.length) throw new VtpmError('EPROTO', `the server changed the size of ${name} from ${out.length} to ${r.total} mid-load`);
        if (r.data.length > out.length - off || (r.data.length === 0 && off < out.length)) {
          throw new VtpmError('EPROTO', `the server sent ${r.data.length} bytes of ${name} at offset ${off} of ${out.length}`);
        }
        out.set(r.data, off); // a copy: the reply may be a view into the transport's buffer
        off += r.data.length;
        if (off === out.length) return out;
        r = this.exchange({ op: 'load', uuid: this.uuid, name, offset: off });
        if (!r.found) throw new VtpmError('EPROTO', `the server lost ${name} mid-load, at offset ${off}`);
      }
    });
  }

  store(name: string, data: Uint8Array): void {
    this.guard('store', name, () => {
      if (data.length > MAX_BLOB) throw new VtpmError('EOVERSIZE', `blob of ${data.length} bytes exceeds ${MAX_BLOB}`);
      let off = 0;
      do {
        const chunk = data.subarray(off, off + CHUNK);
        const r = this.exchange({ op: 'store', uuid: this.uuid, name, total: data.length, offset: off, data: chunk });
        off += chunk.length;
        if (r.stored !== (off === data.length)) {
          throw new VtpmError('EPROTO', `the server answered the chunk ending at ${off} of ${data.length} with stored: ${r.stored}`);
        }
      } while (off < data.length);
    });
  }

  delete(name: string): void {
    this.guard('delete', name, () => void this.exchange({ op: 'delete', uuid: this.uuid, name }));
  }

  /** Release the transport (the tpmif front end's mappings). */
  close(): void {
    this.transport.close();
  }

  private guard<T>(op: StateOp, name: string, fn: () => T): T {
    try {
      if (typeof name !== 'string' || !BLOB_NAME.test(name)) throw new VtpmError('EINVAL', `state blob name ${JSON.stringify(String(name).slice(0, 80))} is not a plain name`);
      return fn();
    } catch (e) {
      throw new VtpmError('ESTATE', `cannot ${op} state blob ${JSON.stringify(String(name).slice(0, 80))} of instance ${this.uuid} through the manager`, { cause: e });
    }
  }

  /** One request, one reply: its result, or the server's error as a VtpmError. */
  private exchange<R extends StateRequest>(req: R) {
    const reply = decodeReply(this.transport.transmitSync(encodeRequest(req), LOCALITY), req.op as R['op']);
    if ('error' in reply) throw errorFromWire(reply.error);
    return reply.reply;
  }
}
