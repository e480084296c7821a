// TPM 2.0 structures the client needs (Part 2): algorithm ids, object/NV attributes,
// TPMT_PUBLIC templates and parsing, names, TPMS_ATTEST and TPMT_SIGNATURE, all on the
// one reader/writer pair. Keys are ECC NIST P-256: fast to create in software chips.
import { createHash, createPublicKey } from 'node:crypto';
import { VtpmError } from '../base/errors.ts';
import { Reader, Writer } from './marshal.ts';
import { DIGEST_SIZE, type PcrSelection, readPcrSelection } from './tpm2.ts';

export const TPM_ALG = {
  RSA: 0x0001,
  SHA1: 0x0004,
  HMAC: 0x0005,
  AES: 0x0006,
  KEYEDHASH: 0x0008,
  XOR: 0x000a,
  SHA256: 0x000b,
  SHA384: 0x000c,
  SHA512: 0x000d,
  NULL: 0x0010,
  RSASSA: 0x0014,
  ECDSA: 0x0018,
  ECDH: 0x0019,
  ECC: 0x0023,
  SYMCIPHER: 0x0025,
  CFB: 0x0043,
} as const;
export const TPM_ECC_NIST_P256 = 0x0003;

export const TPMA_OBJECT = {
  fixedTPM: 0x2,
  fixedParent: 0x10,
  sensitiveDataOrigin: 0x20,
  userWithAuth: 0x40,
  noDA: 0x400,
  restricted: 0x10000,
  decrypt: 0x20000,
  sign: 0x40000,
} as const;

export const TPMA_NV = {
  OWNERWRITE: 0x2,
  AUTHWRITE: 0x4,
  COUNTER: 0x1 << 4, // TPM_NT_COUNTER in the type field (bits 4..7)
  OWNERREAD: 0x20000,
  AUTHREAD: 0x40000,
  NO_DA: 0x2000000,
  WRITTEN: 0x20000000,
} as const;

export const TPM_ST_ATTEST_CERTIFY = 0x8017;
export const TPM_ST_ATTEST_QUOTE = 0x8018;
export const TPM_ST_HASHCHECK = 0x8024;
export const TPM_GENERATED_VALUE = 0xff544347;

const HASH_NAME: Record<number, string> = {
  [TPM_ALG.SHA1]: 'sha1',
  [TPM_ALG.SHA256]: 'sha256',
  [TPM_ALG.SHA384]: 'sha384',
  [TPM_ALG.SHA512]: 'sha512',
};
export function hashName(alg: number): string {
  const n = HASH_NAME[alg];
  if (!n) throw new VtpmError('EINVAL', `hash algorithm 0x${alg.toString(16)} not supported`);
  return n;
}
export function digestSize(alg: number): number {
  return DIGEST_SIZE[alg] ?? (hashName(alg), 0);
}
export function hash(alg: number, ...parts: Uint8Array[]): Uint8Array {
  const h = createHash(hashName(alg));
  for (const p of parts) h.update(p);
  return new Uint8Array(h.digest());
}

/** Name of a permanent, PCR, session handle: the handle itself, big-endian. */
export function handleName(handle: number): Uint8Array {
  return new Writer(4).u32(handle).finish();
}

export interface EccPoint {
  x: Uint8Array;
  y: Uint8Array;
}
export interface PublicArea {
  type: number;
  nameAlg: number;
  attributes: number;
  authPolicy: Uint8Array;
  /** ECC keys: the curve and the public point. */
  curve?: number;
  point?: EccPoint;
  /** The marshalled TPMT_PUBLIC (what the name is computed over). */
  bytes: Uint8Array;
}

export function objectName(pub: Uint8Array, nameAlg: number): Uint8Array {
  return new Writer(2 + digestSize(nameAlg)).u16(nameAlg).bytes(hash(nameAlg, pub)).finish();
}

function writeEccParams(w: Writer, sym: boolean, scheme: number): void {
  if (sym) w.u16(TPM_ALG.AES).u16(128).u16(TPM_ALG.CFB);
  else w.u16(TPM_ALG.NULL);
  w.u16(scheme);
  if (scheme !== TPM_ALG.NULL) w.u16(TPM_ALG.SHA256);
  w.u16(TPM_ECC_NIST_P256).u16(TPM_ALG.NULL); // curve, kdf
  w.sized16(new Uint8Array(0)).sized16(new Uint8Array(0)); // unique: empty point
}

/** Restricted decryption (storage) key, P-256 with AES-128-CFB for its children. */
export function eccStorageTemplate(): Uint8Array {
  const a = TPMA_OBJECT;
  const w = new Writer(64).u16(TPM_ALG.ECC).u16(TPM_ALG.SHA256);
  w.u32(a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin | a.userWithAuth | a.noDA | a.restricted | a.decrypt);
  w.sized16(new Uint8Array(0));
  writeEccParams(w, true, TPM_ALG.NULL);
  return w.finish();
}

/** Unrestricted ECDSA-SHA256 signing key (Sign, Quote, Certify). */
export function eccSigningTemplate(): Uint8Array {
  const a = TPMA_OBJECT;
  const w = new Writer(64).u16(TPM_ALG.ECC).u16(TPM_ALG.SHA256);
  w.u32(a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin | a.userWithAuth | a.noDA | a.sign);
  w.sized16(new Uint8Array(0));
  writeEccParams(w, false, TPM_ALG.ECDSA);
  return w.finish();
}

/** Unrestricted ECDH P-256 decryption key (ECDH_ZGen: a peer's ephemeral point in, the
 *  shared point out), for receiving secrets wrapped to this TPM. */
export function eccDecryptTemplate(): Uint8Array {
  const a = TPMA_OBJECT;
  const w = new Writer(64).u16(TPM_ALG.ECC).u16(TPM_ALG.SHA256);
  w.u32(a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin | a.userWithAuth | a.noDA | a.decrypt);
  w.sized16(new Uint8Array(0));
  writeEccParams(w, false, TPM_ALG.ECDH);
  return w.finish();
}

/** Sealed data object usable only through `policy` (no userWithAuth). */
export function sealedDataTemplate(policy: Uint8Array): Uint8Array {
  const a = TPMA_OBJECT;
  const w = new Writer(64).u16(TPM_ALG.KEYEDHASH).u16(TPM_ALG.SHA256);
  w.u32(a.fixedTPM | a.fixedParent | a.noDA);
  w.sized16(policy);
  w.u16(TPM_ALG.NULL); // scheme
  w.sized16(new Uint8Array(0)); // unique
  return w.finish();
}

function readSymDef(r: Reader): void {
  if (r.u16('sym.alg') !== TPM_ALG.NULL) r.skip(4, 'sym.keyBits+mode');
}
function readScheme(r: Reader): void {
  const alg = r.u16('scheme');
  if (alg === TPM_ALG.NULL) return;
  r.u16('scheme.hash');
  if (alg === TPM_ALG.XOR) r.u16('scheme.kdf');
}

/** Parse a TPMT_PUBLIC (the contents of a TPM2B_PUBLIC). */
export function parsePublic(bytes: Uint8Array): PublicArea {
  const r = new Reader(bytes);
  const type = r.u16('type');
  const nameAlg = r.u16('nameAlg');
  const attributes = r.u32('objectAttributes');
  const authPolicy = r.sized16('authPolicy', 64).slice();
  const out: PublicArea = { type, nameAlg, attributes, authPolicy, bytes: bytes.slice() };
  switch (type) {
    case TPM_ALG.ECC:
      readSymDef(r);
      readScheme(r);
      out.curve = r.u16('curveID');
      readScheme(r); // kdf
      out.point = { x: r.sized16('x', 66).slice(), y: r.sized16('y', 66).slice() };
      break;
    case TPM_ALG.RSA:
      readSymDef(r);
      readScheme(r);
      r.skip(6, 'keyBits+exponent');
      r.sized16('unique', 512);
      break;
    case TPM_ALG.KEYEDHASH:
      readScheme(r);
      r.sized16('unique', 64);
      break;
    case TPM_ALG.SYMCIPHER:
      readSymDef(r);
      r.sized16('unique', 64);
      break;
    default:
      throw new VtpmError('EINVAL', `public area of type 0x${type.toString(16)}`);
  }
  r.expectEnd('TPMT_PUBLIC');
  return out;
}

/** The ECC public key as a Node KeyObject (for signature checks, PEM export, ECDH). */
export function eccPublicKey(pub: PublicArea) {
  if (pub.curve !== TPM_ECC_NIST_P256 || !pub.point) throw new VtpmError('EINVAL', 'not a P-256 public key');
  const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64url');
  return createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: b64(pub.point.x), y: b64(pub.point.y) }, format: 'jwk' });
}

export interface NvPublic {
  index: number;
  nameAlg: number;
  attributes: number;
  authPolicy: Uint8Array;
  dataSize: number;
}
export function writeNvPublic(w: Writer, nv: NvPublic): void {
  w.u32(nv.index).u16(nv.nameAlg).u32(nv.attributes).sized16(nv.authPolicy).u16(nv.dataSize);
}
export function nvPublicBytes(nv: NvPublic): Uint8Array {
  const w = new Writer(32);
  writeNvPublic(w, nv);
  return w.finish();
}
export function parseNvPublic(bytes: Uint8Array): NvPublic {
  const r = new Reader(bytes);
  const nv = { index: r.u32(), nameAlg: r.u16(), attributes: r.u32(), authPolicy: r.sized16('authPolicy', 64).slice(), dataSize: r.u16() };
  r.expectEnd('TPMS_NV_PUBLIC');
  return nv;
}

export interface Signature {
  sigAlg: number;
  hashAlg: number;
  /** ECDSA: r and s; RSASSA: the signature in r. */
  r: Uint8Array;
  s: Uint8Array;
}
export function readSignature(r: Reader): Signature {
  const sigAlg = r.u16('sigAlg');
  if (sigAlg === TPM_ALG.NULL) throw new VtpmError('EINVAL', 'TPM returned a NULL signature');
  const hashAlg = r.u16('hash');
  if (sigAlg === TPM_ALG.ECDSA) return { sigAlg, hashAlg, r: r.sized16('r', 66).slice(), s: r.sized16('s', 66).slice() };
  if (sigAlg === TPM_ALG.RSASSA) return { sigAlg, hashAlg, r: r.sized16('sig', 512).slice(), s: new Uint8Array(0) };
  throw new VtpmError('EINVAL', `signature algorithm 0x${sigAlg.toString(16)}`);
}

/** ECDSA (r, s) as the DER SEQUENCE openssl and Node verify. */
export function ecdsaDer(sig: Signature): Uint8Array {
  const int = (b: Uint8Array) => {
    let i = 0;
    while (i < b.length - 1 && b[i] === 0) i++;
    const v = b.subarray(i);
    const pad = v[0]! & 0x80 ? [0] : [];
    return [0x02, v.length + pad.length, ...pad, ...v];
  };
  const body = [...int(sig.r), ...int(sig.s)];
  return new Uint8Array([0x30, body.length, ...body]);
}

export interface Attest {
  type: number;
  qualifiedSigner: Uint8Array;
  extraData: Uint8Array;
  clock: bigint;
  resetCount: number;
  restartCount: number;
  safe: boolean;
  firmwareVersion: bigint;
  /** Quote: what was quoted. */
  pcrSelect?: PcrSelection[];
  pcrDigest?: Uint8Array;
  /** Certify: the certified object's names. */
  name?: Uint8Array;
  qualifiedName?: Uint8Array;
}
export function parseAttest(bytes: Uint8Array): Attest {
  const r = new Reader(bytes);
  if (r.u32('magic') !== TPM_GENERATED_VALUE) throw new VtpmError('EINVAL', 'attestation not generated by a TPM (magic)');
  const type = r.u16('type');
  const a: Attest = {
    type,
    qualifiedSigner: r.sized16('qualifiedSigner', 68).slice(),
    extraData: r.sized16('extraData', 64).slice(),
    clock: r.u64('clock'),
    resetCount: r.u32('resetCount'),
    restartCount: r.u32('restartCount'),
    safe: r.u8('safe') !== 0,
    firmwareVersion: r.u64('firmwareVersion'),
  };
  if (type === TPM_ST_ATTEST_QUOTE) {
    a.pcrSelect = readPcrSelection(r);
    a.pcrDigest = r.sized16('pcrDigest', 64).slice();
  } else if (type === TPM_ST_ATTEST_CERTIFY) {
    a.name = r.sized16('name', 68).slice();
    a.qualifiedName = r.sized16('qualifiedName', 68).slice();
  } else {
    throw new VtpmError('EINVAL', `attestation type 0x${type.toString(16)} not parsed`);
  }
  r.expectEnd('TPMS_ATTEST');
  return a;
}
