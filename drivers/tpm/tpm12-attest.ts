// TPM 1.2 commands for provisioning an endorsement key and its certificate (TPM Main
// Part 3; TCG PC Client spec for the stored-certificate header), as swtpm_setup does for
// a TPM 1.2: assert physical presence (TSC_PhysicalPresence), TPM_CreateEndorsementKeyPair,
// TPM_NV_DefineSpace + TPM_NV_WriteValue at TPM_NV_INDEX_EKCert while NV is unlocked (no
// authorisation is checked then), and the NV lock (DefineSpace of 0xFFFFFFFF).
import { randomBytes } from 'node:crypto';
import { buildCommand, parseResponse } from './command.ts';
import { VtpmError } from '../base/errors.ts';
import { Writer } from './marshal.ts';
import { TPM_TAG_RQU_COMMAND } from './tpm12.ts';

export const TPM_NV_INDEX_EKCERT = 0x1000f000;
export const TPM_NV_INDEX_LOCK = 0xffffffff;
/** Written only with physical presence; no read restriction (an EK certificate is public). */
export const TPM_NV_PER_PPWRITE = 0x00000001;
const ORD = { PhysicalPresence: 0x4000000a, CreateEndorsementKeyPair: 0x78, ReadPubek: 0x7c, NV_DefineSpace: 0xcc, NV_WriteValue: 0xcd, NV_ReadValue: 0xcf } as const;
export const TPM_PHYSICAL_PRESENCE_CMD_ENABLE = 0x0020;
export const TPM_PHYSICAL_PRESENCE_PRESENT = 0x0008;
const TPM_ALG_RSA = 1;
const TPM_ES_RSAESOAEP_SHA1_MGF1 = 3;
const TPM_SS_NONE = 1;
const TCG_TAG_PCCLIENT_STORED_CERT = 0x1001;
const TCG_TAG_PCCLIENT_FULL_CERT = 0x1002;
/** NV_WriteValue / NV_ReadValue chunk: below TPM 1.2's input buffer. */
export const NV12_CHUNK = 1024;

export function physicalPresence(flags: number): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.PhysicalPresence, (w) => w.u16(flags));
}

/** RSA 2048, OAEP-SHA1, no signing: the EK's TPM_KEY_PARMS. */
function writeEkParms(w: Writer): void {
  w.u32(TPM_ALG_RSA).u16(TPM_ES_RSAESOAEP_SHA1_MGF1).u16(TPM_SS_NONE).u32(12).u32(2048).u32(2).u32(0);
}

export function createEndorsementKeyPair(antiReplay: Uint8Array = randomBytes(20)): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.CreateEndorsementKeyPair, (w) => {
    w.bytes(antiReplay);
    writeEkParms(w);
  });
}
export function readPubek(antiReplay: Uint8Array = randomBytes(20)): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.ReadPubek, (w) => w.bytes(antiReplay));
}

/** The EK's modulus from a CreateEndorsementKeyPair or ReadPubek response (TPM_PUBKEY, checksum). */
export function parsePubek(resp: Uint8Array): Uint8Array {
  const r = parseResponse(resp, '1.2').body;
  if (r.u32('algorithmID') !== TPM_ALG_RSA) throw new VtpmError('EINVAL', 'the EK is not an RSA key');
  r.u16('encScheme');
  r.u16('sigScheme');
  const parms = r.sub(r.u32('parmSize'), 'TPM_RSA_KEY_PARMS');
  const bits = parms.u32('keyLength');
  parms.u32('numPrimes');
  if (parms.sized32('exponent', 8).length !== 0) throw new VtpmError('EINVAL', 'the EK has a non-default exponent');
  const modulus = r.sized32('modulus', 512).slice();
  if (modulus.length * 8 !== bits) throw new VtpmError('EINVAL', `EK modulus of ${modulus.length} bytes for ${bits} bits`);
  r.bytes(20, 'checksum');
  r.expectEnd('TPM_PUBKEY response');
  return modulus;
}

/** TPM_NV_DefineSpace with no authorisation (NV unlocked); size 0 of TPM_NV_INDEX_LOCK locks NV. */
export function nvDefineSpace(index: number, permission: number, size: number): Uint8Array {
  const pcrInfoShort = (w: Writer) => w.u16(3).u8(0).u8(0).u8(0).u8(0x1f).bytes(new Uint8Array(20));
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.NV_DefineSpace, (w) => {
    w.u16(0x0018).u32(index); // TPM_TAG_NV_DATA_PUBLIC
    pcrInfoShort(w);
    pcrInfoShort(w);
    w.u16(0x0017).u32(permission); // TPM_TAG_NV_ATTRIBUTES
    w.u8(0).u8(0).u8(0).u32(size); // bReadSTClear, bWriteSTClear, bWriteDefine, dataSize
    w.bytes(new Uint8Array(20)); // encAuth
  });
}
export function nvWriteValue(index: number, offset: number, data: Uint8Array): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.NV_WriteValue, (w) => w.u32(index).u32(offset).sized32(data));
}
export function nvReadValue(index: number, offset: number, size: number): Uint8Array {
  return buildCommand(TPM_TAG_RQU_COMMAND, ORD.NV_ReadValue, (w) => w.u32(index).u32(offset).u32(size));
}
export function parseNvReadValue(resp: Uint8Array): Uint8Array {
  return parseResponse(resp, '1.2').body.sized32('data', 4096).slice();
}
export function parseOk(resp: Uint8Array): void {
  parseResponse(resp, '1.2');
}

/** TCG_PCCLIENT_STORED_CERT (full cert) header + the DER, as stored at TPM_NV_INDEX_EKCert. */
export function storedCert(der: Uint8Array): Uint8Array {
  return new Writer(der.length + 7).u16(TCG_TAG_PCCLIENT_STORED_CERT).u8(0).u16(der.length + 2).u16(TCG_TAG_PCCLIENT_FULL_CERT).bytes(der).finish();
}
/** The DER inside a stored-certificate header. */
export function unstoreCert(stored: Uint8Array): Uint8Array {
  const b = Buffer.from(stored);
  if (b.length < 7 || b.readUInt16BE(0) !== TCG_TAG_PCCLIENT_STORED_CERT || b[2] !== 0 || b.readUInt16BE(5) !== TCG_TAG_PCCLIENT_FULL_CERT) {
    throw new VtpmError('EINVAL', 'not a TCG stored full certificate');
  }
  const size = b.readUInt16BE(3) - 2;
  if (size < 0 || 7 + size > b.length) throw new VtpmError('ETRUNC', 'stored certificate shorter than its header says');
  return new Uint8Array(b.subarray(7, 7 + size));
}
