// The manager's end of the state link (vtpmmgr's side): the handler it gives
// TpmifBack.serveSync for one vtpmd's link. Requests and chunking: protocol.ts.
//
//   const back = TpmifBack.attach(params)
//   back.serveSync(stateLinkHandler({ uuid, backend: instanceStore, log }))
//
// One handler per link: it holds that link's transfer in progress (a store's partial blob
// or a load's snapshot). It never throws: every failure is an error reply, a backend's
// with its code and causes (ENOSPC under ESTATE, EINTEGRITY, EROLLBACK...). It serves only
// `uuid`: a request naming another instance is refused (EPERM) and the offender logged
// once. Log lines name blobs, offsets and errors, never bytes of a request or a blob.
import { describeError, errorToWire, VtpmError } from '../base/errors.ts';
import type { StateStore } from '../tpm/engine.ts';
import type { TpmifHandler } from '../tpmback/tpmif-back.ts';
import { CHUNK, decodeRequest, encodeErrorReply, encodeReply, MAX_BLOB, parseRequest, requestUuid, type StateRequest } from './protocol.ts';

export interface StateLinkServerOptions {
  /** The instance this link belongs to (the manager's record of the vtpmd it started). */
  uuid: string;
  backend: StateStore;
  log: (line: string) => void;
}

type Transfer =
  | { kind: 'store'; name: string; total: number; buf: Uint8Array; received: number }
  | { kind: 'load'; name: string; blob: Uint8Array; sent: number };

/** Distinct offenders (foreign uuids) and protocol errors logged per link, at most. */
const LOG_OFFENDERS = 16;
const LOG_PROTOCOL_ERRORS = 32;

/** A backend failure, already logged: the reply carries `error` as it is. */
class BackendFailure {
  constructor(readonly error: unknown) {}
}

const proto = (msg: string): VtpmError => new VtpmError('EPROTO', msg);

export function stateLinkHandler(o: StateLinkServerOptions): TpmifHandler {
  let transfer: Transfer | null = null;
  const offenders = new Set<string>();
  let protocolErrors = 0;
  const fallback = encodeErrorReply({ code: 'EIO', message: 'state link server: cannot encode the reply' });
  const say = (line: string): void => {
    try {
      o.log(line);
    } catch {
      // a failing log must not fail the request
    }
  };

  function backend<T>(what: string, fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      say(`state link ${o.uuid}: ${what} failed: ${describeError(e)}`);
      throw new BackendFailure(e);
    }
  }

  function refusal(uuid: string): VtpmError {
    if (!offenders.has(uuid) && offenders.size < LOG_OFFENDERS) {
      offenders.add(uuid);
      say(`state link ${o.uuid}: refused a request for instance ${JSON.stringify(uuid)}: this link serves only ${o.uuid}`);
    }
    return new VtpmError('EPERM', `this state link serves instance ${o.uuid}, not ${JSON.stringify(uuid)}`);
  }

  function noteProtocolError(e: unknown): void {
    protocolErrors++;
    if (protocolErrors <= LOG_PROTOCOL_ERRORS) say(`state link ${o.uuid}: refused a request: ${describeError(e)}`);
    if (protocolErrors === LOG_PROTOCOL_ERRORS) say(`state link ${o.uuid}: further refused requests on this link are not logged`);
  }

  function store(r: Extract<StateRequest, { op: 'store' }>, pending: Transfer | null): Uint8Array {
    let t: Extract<Transfer, { kind: 'store' }>;
    if (r.offset === 0) {
      t = { kind: 'store', name: r.name, total: r.total, buf: new Uint8Array(r.total), received: 0 };
    } else {
      if (pending?.kind !== 'store') throw proto(`store chunk of ${r.name} at offset ${r.offset} with no store in progress`);
      if (pending.name !== r.name) throw proto(`store chunk of ${r.name} while ${pending.name} was being stored`);
      if (pending.total !== r.total) throw proto(`store of ${r.name} changed its total from ${pending.total} to ${r.total}`);
      if (pending.received !== r.offset) throw proto(`store chunk of ${r.name} at offset ${r.offset}, expected ${pending.received}`);
      t = pending;
    }
    if (r.data.length === 0 && t.total > 0) throw proto(`empty store chunk of ${r.name} at offset ${r.offset}`);
    if (t.received + r.data.length > t.total) throw proto(`store chunk of ${r.name} ends at ${t.received + r.data.length}, past its total of ${t.total}`);
    t.buf.set(r.data, t.received); // a copy: the request is a view over the shared page
    t.received += r.data.length;
    if (t.received < t.total) {
      transfer = t;
      return encodeReply({ stored: false });
    }
    backend(`store of ${r.name} (${t.total} bytes)`, () => o.backend.store(r.name, t.buf));
    return encodeReply({ stored: true });
  }

  function load(r: Extract<StateRequest, { op: 'load' }>, pending: Transfer | null): Uint8Array {
    let t: Extract<Transfer, { kind: 'load' }>;
    if (r.offset === 0) {
      const blob = backend(`load of ${r.name}`, () => o.backend.load(r.name));
      if (blob === undefined) return encodeReply({ found: false });
      if (blob.length > MAX_BLOB) throw new VtpmError('EOVERSIZE', `blob ${r.name} is ${blob.length} bytes, more than the link carries (${MAX_BLOB})`);
      // the snapshot later chunks come from, whatever the backend holds by then
      t = { kind: 'load', name: r.name, blob: blob.length > CHUNK ? blob.slice() : blob, sent: 0 };
    } else {
      if (pending?.kind !== 'load' || pending.name !== r.name) throw proto(`load of ${r.name} at offset ${r.offset} with no load of it in progress`);
      if (pending.sent !== r.offset) throw proto(`load of ${r.name} at offset ${r.offset}, expected ${pending.sent}`);
      t = pending;
    }
    const data = t.blob.subarray(t.sent, t.sent + CHUNK);
    t.sent += data.length;
    if (t.sent < t.blob.length) transfer = t;
    return encodeReply({ found: true, total: t.blob.length, data });
  }

  function serve(r: StateRequest, pending: Transfer | null): Uint8Array {
    switch (r.op) {
      case 'load':
        return load(r, pending);
      case 'store':
        return store(r, pending);
      case 'delete':
        backend(`delete of ${r.name}`, () => o.backend.delete(r.name));
        return encodeReply({});
    }
  }

  function errorReply(e: unknown): Uint8Array {
    try {
      return encodeErrorReply(errorToWire(e));
    } catch {
      return fallback;
    }
  }

  return (raw: Uint8Array): Uint8Array => {
    // Whatever arrives, the transfer in progress survives only if this request continues it.
    const pending = transfer;
    transfer = null;
    try {
      const msg = decodeRequest(raw);
      const uuid = requestUuid(msg);
      if (uuid !== o.uuid) return errorReply(refusal(uuid));
      return serve(parseRequest(msg), pending);
    } catch (e) {
      if (e instanceof BackendFailure) return errorReply(e.error);
      noteProtocolError(e);
      return errorReply(e);
    }
  };
}
