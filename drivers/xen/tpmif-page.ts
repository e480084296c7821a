// tpmif's shared page (Xen include/public/io/tpmif.h, v2): layout, the states each side
// writes, and mapping a page + channel from plain parameters. The two sides live in
// tpmif-front.ts and tpmif-back.ts; tpmif.ts is the public entry (and the protocol notes).
import { VtpmError } from '../tpm/errors.ts';
import { EvtchnEndpoint, type EvtchnParams } from './evtchn.ts';
import { attachGrant, type GrantParams } from './gnttab.ts';
import { PAGE } from './layout.ts';
import type { Mapping } from './sys.ts';

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
  if (n < 1) throw new VtpmError('EPROTO', 'tpmif page has no extra page');
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
  /** copy of the data area */
  read(): Uint8Array {
    const n = this.length();
    const out = new Uint8Array(n);
    this.readInto(out, n);
    return out;
  }
  readInto(out: Uint8Array, n: number): void {
    if (n <= FIRST_CAP) out.set(this.u8.subarray(DATA_OFF, DATA_OFF + n));
    else {
      out.set(this.u8.subarray(DATA_OFF, PAGE), 0);
      out.set(this.x8.subarray(0, n - FIRST_CAP), FIRST_CAP);
    }
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

