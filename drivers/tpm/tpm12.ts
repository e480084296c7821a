// TPM 1.2 command builders and response parsers (TPM Main Part 3), on the reader/writer pair.
import { buildCommand, parseResponse, TPM_TAG_RSP_COMMAND } from './command.ts';
import { VtpmError } from '../base/errors.ts';

export const TPM_TAG_RQU_COMMAND = 0x00c1;
export const TPM_TAG_RQU_AUTH1_COMMAND = 0x00c2;
export { TPM_TAG_RSP_COMMAND };

export const TPM_ORD = {
  TakeOwnership: 0x0d,
  CreateWrapKey: 0x1f,
  Extend: 0x14,
  PcrRead: 0x15,
  GetRandom: 0x46,
  ContinueSelfTest: 0x53,
  GetCapability: 0x65,
  CreateEndorsementKeyPair: 0x78,
  MakeIdentity: 0x79,
  SaveState: 0x98,
  Startup: 0x99,
} as const;

export const TPM_ST_CLEAR = 1;
export const TPM_ST_STATE = 2;
export const TPM_CAP_PROPERTY = 5;
export const TPM_CAP_VERSION_VAL = 0x1a;
export const TPM_CAP_PROP_MANUFACTURER = 0x103;

export function startup(type = TPM_ST_CLEAR): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.Startup, (w) => w.u16(type));
}
export function saveState(): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.SaveState);
}
export function continueSelfTest(): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.ContinueSelfTest);
}

export function getRandom(n: number): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.GetRandom, (w) => w.u32(n));
}
export function parseGetRandom(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '1.2').body.sized32('randomBytes', 4096).slice();
}

export function extend(pcr: number, digest: Uint8Array): Uint8Array {
  if (digest.length !== 20) throw new VtpmError('EINVAL', `TPM 1.2 extend takes a 20-byte digest, got ${digest.length}`);
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.Extend, (w) => w.u32(pcr).bytes(digest));
}
export function parseExtend(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '1.2').body.bytes(20, 'outDigest').slice();
}

export function pcrRead(pcr: number): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.PcrRead, (w) => w.u32(pcr));
}
export function parsePcrRead(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '1.2').body.bytes(20, 'outDigest').slice();
}

export function getCapability(capArea: number, subCap: Uint8Array = new Uint8Array(0)): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, TPM_ORD.GetCapability, (w) => w.u32(capArea).sized32(subCap));
}
export function parseGetCapability(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '1.2').body.sized32('resp', 4096).slice();
}

/** TPM_CAP_VERSION_VAL: TPM_CAP_VERSION_INFO → "major.minor rev.revMinor", vendor id. */
export function parseVersionInfo(b: Uint8Array): { version: string; vendor: string } {
  if (b.length < 2 + 4 + 2 + 1 + 4) throw new VtpmError('ETRUNC', 'TPM_CAP_VERSION_INFO too short');
  const [maj, min, rev, revMin] = [b[2]!, b[3]!, b[4]!, b[5]!];
  const vendor = Buffer.from(b.subarray(9, 13)).toString('latin1').replace(/\0+$/, '');
  return { version: `${maj}.${min} rev ${rev}.${revMin}`, vendor };
}
