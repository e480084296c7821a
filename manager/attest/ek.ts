// The vTPM endorsement keys: the TCG EK Credential Profile's default templates (L-1: RSA
// 2048, L-2: ECC NIST P-256; what tpm2_createek and every TSS recreate from the
// endorsement seed), and the public key of a created EK as a SubjectPublicKeyInfo for its
// certificate.
import { createPublicKey, type KeyObject } from 'node:crypto';
import { VtpmError } from '../../drivers/base/errors.ts';
import { Writer } from '../../drivers/tpm/marshal.ts';
import { parseRsaPublic } from '../../drivers/tpm/tpm2-credential.ts';
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
  if (kind === 'rsa') return rsaEkPublic(new Uint8Array(256));
  return start(TPM_ALG.ECC).u16(TPM_ECC_NIST_P256).u16(TPM_ALG.NULL).sized16(new Uint8Array(32)).sized16(new Uint8Array(32)).finish();
}

/** Template L-1 with `modulus` as its unique field: the TPMT_PUBLIC of an RSA EK made
 *  from that template (what TPM2_CreatePrimary returns, and its name). */
function rsaEkPublic(modulus: Uint8Array): Uint8Array {
  return start(TPM_ALG.RSA).u16(2048).u32(0).sized16(modulus).finish();
}

/** The TPMT_PUBLIC of the TCG default RSA EK whose public key is `key`: a verifier holding
 *  only an EK public key (an EK certificate's, tpm2_createek -f pem) rebuilds it to name
 *  the EK, as tpm2_makecredential -G rsa does. */
export function rsaEkPublicFromKey(key: KeyObject): Uint8Array {
  const jwk = key.export({ format: 'jwk' });
  if (key.asymmetricKeyType !== 'rsa' || !jwk.n || jwk.e !== 'AQAB') throw new VtpmError('EINVAL', 'not an RSA key with exponent 65537 (the TCG EK template L-1 is RSA 2048)');
  const modulus = new Uint8Array(Buffer.from(jwk.n, 'base64url'));
  if (modulus.length !== 256) throw new VtpmError('EINVAL', `an RSA key of ${modulus.length * 8} bits, not 2048 (the TCG EK template L-1)`);
  return rsaEkPublic(modulus);
}

/** The key of an RSA or P-256 TPMT_PUBLIC as a Node KeyObject. */
export function publicKeyOf(bytes: Uint8Array): KeyObject {
  const pub = parsePublic(bytes);
  if (pub.type === TPM_ALG.ECC) return eccPublicKey(pub);
  const { modulus: n, exponent: e } = parseRsaPublic(bytes);
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
