// The vTPM endorsement keys: the TCG EK Credential Profile's default templates (L-1: RSA
// 2048, L-2: ECC NIST P-256; what tpm2_createek and every TSS recreate from the
// endorsement seed), and the public key of a created EK as a SubjectPublicKeyInfo for its
// certificate.
import { createPublicKey, type KeyObject } from 'node:crypto';
import { VtpmError } from '../../drivers/base/errors.ts';
import { Reader, Writer } from '../../drivers/tpm/marshal.ts';
import { TPMA_OBJECT, TPM_ALG, TPM_ECC_NIST_P256, eccPublicKey, parsePublic } from '../../drivers/tpm/tpm2-structures.ts';

/** PolicySecret(TPM_RH_ENDORSEMENT): the EK's authPolicy in both default templates. */
const EK_POLICY = Buffer.from('837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa', 'hex');
const ADMIN_WITH_POLICY = 0x80;
const EK_ATTRIBUTES = TPMA_OBJECT.fixedTPM | TPMA_OBJECT.fixedParent | TPMA_OBJECT.sensitiveDataOrigin | ADMIN_WITH_POLICY | TPMA_OBJECT.restricted | TPMA_OBJECT.decrypt;

export type EkKind = 'rsa' | 'ecc';

/** Where a TPM maker puts each EK's certificate (EK Credential Profile, low range). */
export const EK_CERT_INDEX: Record<EkKind, number> = { rsa: 0x01c00002, ecc: 0x01c0000a };
/** The platform certificate index (PC Client Platform TPM Profile). */
export const PLATFORM_CERT_INDEX = 0x01c08000;

function start(type: number): Writer {
  const w = new Writer(400).u16(type).u16(TPM_ALG.SHA256).u32(EK_ATTRIBUTES).sized16(EK_POLICY);
  return w.u16(TPM_ALG.AES).u16(128).u16(TPM_ALG.CFB).u16(TPM_ALG.NULL); // symmetric, scheme
}

export function ekTemplate(kind: EkKind): Uint8Array {
  if (kind === 'rsa') return start(TPM_ALG.RSA).u16(2048).u32(0).sized16(new Uint8Array(256)).finish();
  return start(TPM_ALG.ECC).u16(TPM_ECC_NIST_P256).u16(TPM_ALG.NULL).sized16(new Uint8Array(32)).sized16(new Uint8Array(32)).finish();
}

/** The modulus and exponent of an RSA TPMT_PUBLIC (parsePublic keeps neither). */
function rsaParts(bytes: Uint8Array): { n: Uint8Array; e: number } {
  const r = new Reader(bytes);
  if (r.u16('type') !== TPM_ALG.RSA) throw new VtpmError('EINVAL', 'not an RSA public area');
  r.u16('nameAlg');
  r.u32('objectAttributes');
  r.sized16('authPolicy', 64);
  if (r.u16('symmetric') !== TPM_ALG.NULL) r.skip(4, 'keyBits+mode');
  if (r.u16('scheme') !== TPM_ALG.NULL) r.u16('scheme.hash');
  r.u16('keyBits');
  const e = r.u32('exponent') || 65537;
  const n = r.sized16('modulus', 512).slice();
  r.expectEnd('TPMT_PUBLIC');
  return { n, e };
}

/** The key of an RSA or P-256 TPMT_PUBLIC as a Node KeyObject. */
export function publicKeyOf(bytes: Uint8Array): KeyObject {
  const pub = parsePublic(bytes);
  if (pub.type === TPM_ALG.ECC) return eccPublicKey(pub);
  const { n, e } = rsaParts(bytes);
  const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64url');
  let eb = Buffer.alloc(4);
  eb.writeUInt32BE(e);
  eb = eb.subarray(eb.findIndex((x) => x !== 0));
  return createPublicKey({ key: { kty: 'RSA', n: b64(n), e: b64(eb) }, format: 'jwk' });
}

/** SubjectPublicKeyInfo DER of a TPMT_PUBLIC. */
export function spkiOf(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(publicKeyOf(bytes).export({ type: 'spki', format: 'der' }));
}

/** A DER SubjectPublicKeyInfo from an RSA modulus (TPM 1.2 EK: exponent 65537). */
export function rsaSpki(modulus: Uint8Array, exponent = 65537): Uint8Array {
  const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64url');
  const eb = Buffer.from([exponent >>> 16, (exponent >>> 8) & 0xff, exponent & 0xff]);
  return new Uint8Array(createPublicKey({ key: { kty: 'RSA', n: b64(modulus), e: b64(eb) }, format: 'jwk' }).export({ type: 'spki', format: 'der' }));
}
