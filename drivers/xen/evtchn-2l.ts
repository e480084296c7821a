// The 2-level event area of a domain file (layout.ts), the part every party uses: raising a
// port (what Xen's evtchn_2l_set_pending does for the sender, here done by the notifier
// itself), and finding where a channel side's events go. The waiter's part (scan, sleep,
// mask) is EvtchnMux (evtchn-mux.ts).
import path from 'node:path';
import { futexWake, mapFile, type Mapping } from '../base/libc.ts';
import { EW_RDOM, EW_RPORT, HDR_MASK, HDR_PENDING, MUX_VCPUS, PAGE, UPCALL_SLEEP, V_OWNER, V_PID, V_SEL, V_STOP, V_UPCALL, memPath, vcpuWord } from './layout.ts';

/** Page 0 of a domain file: `h` indexes its i32 words, `addr` is the address of word 0. */
export interface EventArea {
  readonly h: Int32Array;
  readonly addr: bigint;
  readonly mapping: Mapping | null;
}

export function mapArea(file: string): EventArea {
  const m = mapFile(file, 0, PAGE, true);
  return { h: new Int32Array(m.buffer), addr: m.addr, mapping: m };
}

/** The domain file whose area side `side` of the record at (`file`, base) reports to. */
export function areaFileOf(file: string, w: Int32Array, base: number, side: 0 | 1): string {
  return side === 0 ? file : memPath(path.dirname(path.dirname(file)), Atomics.load(w, base + EW_RDOM));
}

/** The port (bit) side `side` of record `record` is known by in its own domain. */
export function portOf(w: Int32Array, base: number, record: number, side: 0 | 1): number {
  return side === 0 ? record : Atomics.load(w, base + EW_RPORT);
}

/** Raise `port` for vcpu `v` (Xen's order: pending bit, unless masked the selector bit,
 *  then the upcall word, FUTEX_WAKE only if the vcpu's waiter sleeps). A port already
 *  pending coalesces; a selector bit already set means an upcall is already on its way. */
export function raisePort(a: EventArea, port: number, v: number): void {
  const h = a.h;
  const word = port >>> 5;
  const bit = 1 << (port & 31);
  if ((Atomics.or(h, HDR_PENDING + word, bit) & bit) !== 0) return;
  if ((Atomics.load(h, HDR_MASK + word) & bit) !== 0) return;
  const sel = 1 << word;
  if ((Atomics.or(h, vcpuWord(v, V_SEL), sel) & sel) !== 0) return;
  kickVcpu(a, v);
}

/** Mark vcpu `v`'s upcall pending; wake its waiter if it sleeps. */
export function kickVcpu(a: EventArea, v: number): void {
  const u = vcpuWord(v, V_UPCALL);
  if (Atomics.exchange(a.h, u, 1) === UPCALL_SLEEP) futexWake(a.addr + BigInt(u * 4), 1);
}

/** Ask every mux of process `pid` on this area (`h` from word 0 of page 0) to stop: its
 *  waitAny throws ECANCELED. */
export function stopMuxesOf(h: Int32Array, addr: bigint, pid: number): void {
  for (let v = 0; v < MUX_VCPUS; v++) {
    if (Atomics.load(h, vcpuWord(v, V_OWNER)) === 0 || Atomics.load(h, vcpuWord(v, V_PID)) !== pid) continue;
    Atomics.store(h, vcpuWord(v, V_STOP), 1);
    kickVcpu({ h, addr, mapping: null }, v);
  }
}
