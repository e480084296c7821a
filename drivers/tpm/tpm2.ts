// TPM 2.0 command builders and response parsers (Part 3 of the spec), on the one
// reader/writer pair. Commands here take no object authorisation beyond the empty
// password session; the full client for the hardware TPM builds on these.
import { buildCommand, parseResponse, TPM_ST_NO_SESSIONS } from './command.ts';
import { VtpmError } from '../base/errors.ts';
import type { Reader, Writer } from './marshal.ts';

export { TPM_ST_NO_SESSIONS };
export const TPM_ST_SESSIONS = 0x8002;

export const TPM_CC = {
  NV_UndefineSpace: 0x122,
  EvictControl: 0x120,
  CreatePrimary: 0x131,
  NV_DefineSpace: 0x12a,
  SelfTest: 0x143,
  Startup: 0x144,
  Shutdown: 0x145,
  NV_Read: 0x14e,
  Create: 0x153,
  Load: 0x157,
  Quote: 0x158,
  Sign: 0x15d,
  Unseal: 0x15e,
  ContextLoad: 0x161,
  ContextSave: 0x162,
  FlushContext: 0x165,
  ReadPublic: 0x173,
  StartAuthSession: 0x176,
  GetCapability: 0x17a,
  GetRandom: 0x17b,
  PCR_Read: 0x17e,
  PCR_Extend: 0x182,
  NV_Write: 0x137,
  NV_Increment: 0x134,
} as const;

export const TPM_SU_CLEAR = 0;
export const TPM_SU_STATE = 1;
export const TPM_RS_PW = 0x40000009;
export const TPM_RH_OWNER = 0x40000001;
export const TPM_RH_NULL = 0x40000007;
export const TPM_RH_ENDORSEMENT = 0x4000000b;
export const TPM_RH_PLATFORM = 0x4000000c;
export const TPM_ALG_SHA1 = 0x0004;
export const TPM_ALG_SHA256 = 0x000b;
export const TPM_ALG_SHA384 = 0x000c;
export const TPM_ALG_SHA512 = 0x000d;
export const TPM_CAP_ALGS = 0;
export const TPM_CAP_HANDLES = 1;
export const TPM_CAP_PCRS = 5;
export const TPM_CAP_TPM_PROPERTIES = 6;
export const TPM_PT_MANUFACTURER = 0x105;
export const TPM_PT_FIRMWARE_VERSION_1 = 0x10b;
export const TPM_PT_FIRMWARE_VERSION_2 = 0x10c;

export const DIGEST_SIZE: Record<number, number> = {
  [TPM_ALG_SHA1]: 20,
  [TPM_ALG_SHA256]: 32,
  [TPM_ALG_SHA384]: 48,
  [TPM_ALG_SHA512]: 64,
};

/** Empty password session for one authorised handle: TPMS_AUTH_COMMAND. */
export function writePasswordAuth(w: Writer, password: Uint8Array = new Uint8Array(0)): void {
  w.u32(9 + password.length); // authorizationSize
  w.u32(TPM_RS_PW).sized16(new Uint8Array(0)).u8(0).sized16(password);
}

export function startup(type = TPM_SU_CLEAR): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.Startup, (w) => w.u16(type));
}

export function shutdown(type = TPM_SU_STATE): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.Shutdown, (w) => w.u16(type));
}

export function selfTest(full = true): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.SelfTest, (w) => w.u8(full ? 1 : 0));
}

export function getRandom(n: number): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.GetRandom, (w) => w.u16(n));
}
export function parseGetRandom(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '2.0').body.sized16('randomBytes').slice();
}

export function pcrExtend(pcr: number, digests: { alg: number; digest: Uint8Array }[]): Uint8Array {
  return buildCommand(TPM_ST_SESSIONS, TPM_CC.PCR_Extend, (w) => {
    w.u32(pcr);
    writePasswordAuth(w);
    w.u32(digests.length);
    for (const d of digests) {
      if (d.digest.length !== DIGEST_SIZE[d.alg]) throw new VtpmError('EINVAL', `digest of ${d.digest.length} bytes for alg 0x${d.alg.toString(16)}`);
      w.u16(d.alg).bytes(d.digest);
    }
  });
}
export function parsePcrExtend(resp: Uint8Array): void {
  parseResponse(resp, '2.0');
}

export interface PcrSelection {
  alg: number;
  pcrs: number[];
}
export function writePcrSelection(w: Writer, sel: PcrSelection[]): void {
  w.u32(sel.length);
  for (const s of sel) {
    const bits = new Uint8Array(3);
    for (const p of s.pcrs) {
      if (p < 0 || p >= 24) throw new VtpmError('EINVAL', `PCR ${p} out of range 0..23`);
      bits[p >> 3]! |= 1 << (p & 7);
    }
    w.u16(s.alg).u8(3).bytes(bits);
  }
}
export function readPcrSelection(r: Reader): PcrSelection[] {
  const n = r.u32('pcrSelection.count');
  if (n > 16) throw new VtpmError('EOVERSIZE', `${n} PCR banks`);
  const out: PcrSelection[] = [];
  for (let i = 0; i < n; i++) {
    const alg = r.u16('hash');
    const bits = r.bytes(r.u8('sizeofSelect'), 'pcrSelect');
    const pcrs: number[] = [];
    bits.forEach((b, byte) => {
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) pcrs.push(byte * 8 + bit);
    });
    out.push({ alg, pcrs });
  }
  return out;
}

export function pcrRead(sel: PcrSelection[]): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.PCR_Read, (w) => writePcrSelection(w, sel));
}
export interface PcrReadResult {
  updateCounter: number;
  selection: PcrSelection[];
  digests: Uint8Array[];
}
export function parsePcrRead(resp: Uint8Array): PcrReadResult {
  const r = parseResponse(resp, '2.0').body;
  const updateCounter = r.u32('pcrUpdateCounter');
  const selection = readPcrSelection(r);
  const n = r.u32('pcrValues.count');
  if (n > 32) throw new VtpmError('EOVERSIZE', `${n} PCR digests`);
  const digests: Uint8Array[] = [];
  for (let i = 0; i < n; i++) digests.push(r.sized16('digest', 64).slice());
  return { updateCounter, selection, digests };
}

export function getCapability(capability: number, property: number, count: number): Uint8Array {
  return buildCommand(TPM_ST_NO_SESSIONS, TPM_CC.GetCapability, (w) => w.u32(capability).u32(property).u32(count));
}
export interface CapabilityResult {
  moreData: boolean;
  capability: number;
  /** TPM_CAP_TPM_PROPERTIES: property → value. */
  properties?: Map<number, number>;
  /** TPM_CAP_PCRS: allocated banks. */
  pcrs?: PcrSelection[];
  /** TPM_CAP_HANDLES: handles. TPM_CAP_ALGS: algorithm ids. */
  list?: number[];
}
export function parseGetCapability(resp: Uint8Array): CapabilityResult {
  const r = parseResponse(resp, '2.0').body;
  const moreData = r.u8('moreData') !== 0;
  const capability = r.u32('capability');
  const out: CapabilityResult = { moreData, capability };
  const count = () => {
    const n = r.u32('count');
    if (n > 1024) throw new VtpmError('EOVERSIZE', `capability list of ${n}`);
    return n;
  };
  switch (capability) {
    case TPM_CAP_TPM_PROPERTIES: {
      out.properties = new Map();
      for (let i = count(); i > 0; i--) out.properties.set(r.u32('property'), r.u32('value'));
      break;
    }
    case TPM_CAP_PCRS:
      out.pcrs = readPcrSelection(r);
      break;
    case TPM_CAP_HANDLES:
      out.list = [];
      for (let i = count(); i > 0; i--) out.list.push(r.u32('handle'));
      break;
    case TPM_CAP_ALGS:
      out.list = [];
      for (let i = count(); i > 0; i--) {
        out.list.push(r.u16('alg'));
        r.u32('algAttributes');
      }
      break;
    default:
      throw new VtpmError('EINVAL', `capability 0x${capability.toString(16)} not parsed`);
  }
  return out;
}
