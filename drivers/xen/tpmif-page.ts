// tpmif v2: the vTPM shared-page protocol (Xen include/public/io/tpmif.h), both sides;
// this file holds the page layout and attachment; the front half is
// drivers/tpmfront/tpmif-front.ts, the back half drivers/tpmback/tpmif-back.ts.
//
// Page layout (little-endian): u32 length @0, u8 state @4 (0 IDLE, 1 SUBMIT, 2 FINISH,
// 3 CANCEL), u8 locality @5, u8 pad @6, u8 nr_extra_pages @7, u32 extra_pages[] @8, data
// at 8 + 4*nr_extra_pages. The front writes only SUBMIT/CANCEL, the back only IDLE/FINISH.
// This implementation always grants one extra page (nr_extra_pages = 1): data is 4084
// bytes in the first page and continues in the extra page; commands and responses are
// limited to MAX_TPMIF_DATA = 4096 bytes (EOVERSIZE beyond).
//
// Construction from plain, serialisable parameters (what a worker_thread gets):
//   const p: TpmifParams = frontLink.params   // from XenbusFront.connected() or XenbusBack's onConnect
//   new Worker(file, { workerData: p })
//   // in the worker:
//   const front = TpmifFront.attach(workerData, { timeoutMs })   // maps the page(s) and the channel record
//   const rsp = front.transmitSync(cmd, locality)   // blocks on the futex
//   // or, in vtpmd's engine worker:
//   const back = TpmifBack.attach(workerData)
//   back.serveSync((cmd, locality) => engine.process(cmd))  // returns 'stopped' | 'closed'
//   // from any other thread: TpmifBack.stopFrom(p)
// TpmifParams = { page: GrantParams, extra: GrantParams, evtchn: EvtchnParams } (see
// gnttab.ts / evtchn.ts): file path + byte offset of each page, channel record + side.
//
// Front (drivers/tpmfront/tpmif-front.ts, a SyncTransport): transmitSync(cmd, locality) →
// response (blocking, no event loop), or split as begin(cmd, locality) + finish() so the
// caller works while the back end runs the command (timeout, spin and response-buffer reuse
// are construction options); send(...) → Promise (event-loop form); cancel() (any thread,
// or from the main thread while send() is pending): the back aborts if it can; the pending
// call then gets the response (back finished anyway) or ECANCELED. A second submit while
// one is in flight → EBUSY. Timeout → ETIMEDOUT (the command is cancelled; the page is
// reusable once the back end acknowledges). Channel closed or back end dead → ECLOSED.
// The back end answering IDLE without a cancel (its handler threw) → EIO.
// Back (drivers/tpmback/tpmif-back.ts): serveSync(handler) hands each command to the
// handler as a view over the shared page (a copy only when it spans the extra page) and
// writes the handler's response back.
import { VtpmError } from '../base/errors.ts';
import { EvtchnEndpoint, type EvtchnParams } from './evtchn.ts';
import { attachGrant, type GrantParams } from './gnttab.ts';
import { PAGE } from './layout.ts';
import type { Mapping } from '../base/libc.ts';

export const TPMIF_IDLE = 0, TPMIF_SUBMIT = 1, TPMIF_FINISH = 2, TPMIF_CANCEL = 3;
export const MAX_TPMIF_DATA = 4096;
const NR_EXTRA = 1;
const DATA_OFF = 8 + 4 * NR_EXTRA;
const FIRST_CAP = PAGE - DATA_OFF; // 4084

export interface TpmifParams {
  page: GrantParams;
  extra: GrantParams;
  evtchn: EvtchnParams;
}

/** Initialise a fresh shared page (front end, before granting it). */
export function initTpmifPage(page: Uint8Array, extraRef: number): void {
  const dv = new DataView(page.buffer, page.byteOffset, PAGE);
  page.fill(0, 0, DATA_OFF);
  dv.setUint8(7, NR_EXTRA);
  dv.setUint32(8, extraRef, true);
}

/** Extra-page grant ref published in a shared page's header (back end, after mapping). */
export function tpmifExtraRef(page: Uint8Array): number {
  const dv = new DataView(page.buffer, page.byteOffset, PAGE);
  const n = dv.getUint8(7);
  if (n !== NR_EXTRA) throw new VtpmError('EPROTO', `tpmif page announces ${n} extra pages, expected ${NR_EXTRA}`);
  return dv.getUint32(8, true);
}

export class Shared {
  readonly u8: Uint8Array; // page 0 (Uint8Array over the mapping)
  readonly x8: Uint8Array; // extra page
  readonly dv: DataView;
  constructor(page: Uint8Array, extra: Uint8Array, readonly ev: EvtchnEndpoint, readonly maps: Mapping[]) {
    this.u8 = new Uint8Array(page.buffer, page.byteOffset, PAGE);
    this.x8 = new Uint8Array(extra.buffer, extra.byteOffset, PAGE);
    this.dv = new DataView(page.buffer, page.byteOffset, PAGE);
    if (this.u8[7] !== NR_EXTRA) throw new VtpmError('EPROTO', `tpmif page announces ${this.u8[7]} extra pages, expected ${NR_EXTRA}`);
  }
  get state(): number {
    return Atomics.load(this.u8, 4);
  }
  set state(s: number) {
    Atomics.store(this.u8, 4, s);
  }
  write(data: Uint8Array): void {
    const n = data.length;
    if (n > MAX_TPMIF_DATA) throw new VtpmError('EOVERSIZE', `${n} bytes exceed the tpmif limit of ${MAX_TPMIF_DATA}`);
    if (n <= FIRST_CAP) this.u8.set(data, DATA_OFF);
    else {
      this.u8.set(data.subarray(0, FIRST_CAP), DATA_OFF);
      this.x8.set(data.subarray(FIRST_CAP), 0);
    }
    this.dv.setUint32(0, n, true);
  }
  length(): number {
    const n = this.dv.getUint32(0, true);
    if (n > MAX_TPMIF_DATA) throw new VtpmError('EPROTO', `tpmif length ${n} exceeds ${MAX_TPMIF_DATA}`);
    return n;
  }
  readInto(out: Uint8Array, n: number): void {
    if (n <= FIRST_CAP) out.set(this.u8.subarray(DATA_OFF, DATA_OFF + n));
    else {
      out.set(this.u8.subarray(DATA_OFF, PAGE), 0);
      out.set(this.x8.subarray(0, n - FIRST_CAP), FIRST_CAP);
    }
  }
  /** Zero the first `n` bytes of the data area: a command or response the front end is done
   *  with does not linger in the shared pages (they are files in the run dir). */
  scrub(n: number): void {
    this.u8.fill(0, DATA_OFF, DATA_OFF + Math.min(n, FIRST_CAP));
    if (n > FIRST_CAP) this.x8.fill(0, 0, Math.min(n, MAX_TPMIF_DATA) - FIRST_CAP);
  }
  /** view when it fits the first page, else a copy into `scratch` */
  view(scratch: Uint8Array): Uint8Array {
    const n = this.length();
    if (n <= FIRST_CAP) return this.u8.subarray(DATA_OFF, DATA_OFF + n);
    this.readInto(scratch, n);
    return scratch.subarray(0, n);
  }
  detach(): void {
    for (const m of this.maps) m.unmap();
    this.ev.detach();
  }
}

/** Map the page(s) and the channel record named by plain parameters (any thread). */
export function attachParts(p: TpmifParams): [Uint8Array, Uint8Array, EvtchnEndpoint, Mapping[]] {
  if (!p || !p.page || !p.extra || !p.evtchn) throw new VtpmError('EINVAL', 'bad tpmif parameters');
  const a = attachGrant(p.page);
  const b = attachGrant(p.extra);
  const ev = EvtchnEndpoint.attach(p.evtchn);
  return [a.buf, b.buf, ev, [a.mapping, b.mapping]];
}

