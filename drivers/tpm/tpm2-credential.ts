// Credential protection (TPM 2.0 Part 1 §24): what binds an attestation key (AK) to an
// endorsement key (EK) that can only decrypt. A verifier makes a credential in software
// (makeCredential: a seed RSA-OAEP-encrypted to the EK with label "IDENTITY", KDFa keys
// from the seed, the secret AES-CFB-encrypted, an HMAC over it and the AK's name); only
// the TPM holding that EK's private key and an object of that name returns the secret
// (TPM2_ActivateCredential, the EK authorised by PolicySecret(TPM_RH_ENDORSEMENT) as the
// TCG EK templates require). TPM2_MakeCredential, the TPM's own version, is here for
// cross-checks. The blob formats are the TPM's: TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
import { constants, createCipheriv, createHmac, publicEncrypt, randomBytes, type KeyObject } from 'node:crypto';
import { VtpmError } from '../base/errors.ts';
import { Reader, Writer } from './marshal.ts';
import { permanent, type Entity, type Tpm2Client } from './tpm2-client.ts';
import { TPM_ALG, digestSize, hashName, objectName } from './tpm2-structures.ts';
import { kdfa, type AuthSession } from './tpm2-session.ts';

export const TPM_CC_CREDENTIAL = { ActivateCredential: 0x147, PolicySecret: 0x151, MakeCredential: 0x168 } as const;

/** The fields of an RSA TPMT_PUBLIC that credential protection and key export need. */
export interface RsaPublic {
  nameAlg: number;
  attributes: number;
  authPolicy: Uint8Array;
  /** The symmetric algorithm a restricted decryption key protects its children with. */
  symmetric: { alg: number; bits: number; mode: number };
  keyBits: number;
  exponent: number;
  modulus: Uint8Array;
}

export function parseRsaPublic(bytes: Uint8Array): RsaPublic {
  const r = new Reader(bytes);
  if (r.u16('type') !== TPM_ALG.RSA) throw new VtpmError('EINVAL', 'not an RSA public area');
  const nameAlg = r.u16('nameAlg');
  const attributes = r.u32('objectAttributes');
  const authPolicy = r.sized16('authPolicy', 64).slice();
  const alg = r.u16('symmetric');
  const symmetric = alg === TPM_ALG.NULL ? { alg, bits: 0, mode: TPM_ALG.NULL } : { alg, bits: r.u16('symmetric.keyBits'), mode: r.u16('symmetric.mode') };
  if (r.u16('scheme') !== TPM_ALG.NULL) r.u16('scheme.hash');
  const keyBits = r.u16('keyBits');
  const exponent = r.u32('exponent') || 65537;
  const modulus = r.sized16('modulus', 512).slice();
  r.expectEnd('TPMT_PUBLIC');
  return { nameAlg, attributes, authPolicy, symmetric, keyBits, exponent, modulus };
}

/** What MakeCredential produces: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET contents. */
export interface Credential {
  credentialBlob: Uint8Array;
  encryptedSecret: Uint8Array;
}

/** The largest credential a TPM takes: a TPM2B_DIGEST of the EK's name algorithm. */
const credentialMax = (nameAlg: number) => digestSize(nameAlg);

/** MakeCredential in software for an RSA EK (`ekPublic`: its TPMT_PUBLIC, `ekKey`: the
 *  same key as a KeyObject), naming the object `name` (e.g. an AK's name). */
export function makeCredential(ekPublic: Uint8Array, ekKey: KeyObject, name: Uint8Array, secret: Uint8Array): Credential {
  const ek = parseRsaPublic(ekPublic);
  if (ek.symmetric.alg !== TPM_ALG.AES || ek.symmetric.mode !== TPM_ALG.CFB) throw new VtpmError('EINVAL', 'the EK is not a storage key with AES-CFB (not a TCG EK template)');
  if (secret.length === 0 || secret.length > credentialMax(ek.nameAlg)) throw new VtpmError('EINVAL', `a credential is 1-${credentialMax(ek.nameAlg)} bytes, not ${secret.length}`);
  const h = hashName(ek.nameAlg);
  const seed = new Uint8Array(randomBytes(digestSize(ek.nameAlg)));
  // The seed is "secret" data of an RSA key: OAEP with the key's name hash and label IDENTITY (§B.10.3).
  const encryptedSecret = new Uint8Array(publicEncrypt({ key: ekKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: h, oaepLabel: Buffer.from('IDENTITY\0', 'latin1') }, seed));
  const symKey = kdfa(ek.nameAlg, seed, 'STORAGE', name, new Uint8Array(0), ek.symmetric.bits);
  const hmacKey = kdfa(ek.nameAlg, seed, 'INTEGRITY', new Uint8Array(0), new Uint8Array(0), digestSize(ek.nameAlg) * 8);
  const c = createCipheriv(`aes-${ek.symmetric.bits}-cfb`, symKey, Buffer.alloc(16));
  const encIdentity = Buffer.concat([c.update(new Writer(secret.length + 2).sized16(secret).finish()), c.final()]);
  const integrity = createHmac(h, hmacKey).update(encIdentity).update(name).digest();
  const credentialBlob = new Writer(encIdentity.length + integrity.length + 2).sized16(integrity).bytes(encIdentity).finish();
  return { credentialBlob, encryptedSecret };
}

/** The name of a TPMT_PUBLIC under its own name algorithm. */
export function nameOf(publicArea: Uint8Array): Uint8Array {
  return objectName(publicArea, new Reader(publicArea, 2).u16('nameAlg'));
}

/** TPM2_PolicySecret(authHandle) in `session`: authHandle's own auth (a password session,
 *  the hierarchy's authValue) satisfies the policy. No expiry, no cpHash, no policyRef. */
export async function policySecret(c: Tpm2Client, session: AuthSession, authHandle: Entity): Promise<void> {
  const params = new Writer(16).sized16(new Uint8Array(0)).sized16(new Uint8Array(0)).sized16(new Uint8Array(0)).u32(0).finish();
  const res = await c.run({ cc: TPM_CC_CREDENTIAL.PolicySecret, handles: [authHandle, permanent(session.handle)], auths: [undefined], params });
  res.params.sized16('timeout', 64);
  res.params.u16('ticket.tag');
  res.params.u32('ticket.hierarchy');
  res.params.sized16('ticket.digest', 64);
}

/** TPM2_ActivateCredential: the secret, if `credential` was made for `keyHandle` (the EK,
 *  authorised by `ekSession`) naming `activateHandle` (password auth: its authValue). */
export async function activateCredential(c: Tpm2Client, activateHandle: Entity, keyHandle: Entity, ekSession: AuthSession, credential: Credential): Promise<Uint8Array> {
  const params = new Writer(credential.credentialBlob.length + credential.encryptedSecret.length + 4).sized16(credential.credentialBlob).sized16(credential.encryptedSecret).finish();
  const res = await c.run({ cc: TPM_CC_CREDENTIAL.ActivateCredential, handles: [activateHandle, keyHandle], auths: [undefined, ekSession], params });
  const certInfo = res.params.sized16('certInfo', 64).slice();
  res.params.expectEnd('ActivateCredential response');
  return certInfo;
}

/** TPM2_MakeCredential in the TPM, for the loaded public key `handle` (no authorisation). */
export async function tpmMakeCredential(c: Tpm2Client, handle: number, secret: Uint8Array, name: Uint8Array): Promise<Credential> {
  const params = new Writer(secret.length + name.length + 4).sized16(secret).sized16(name).finish();
  const res = await c.run({ cc: TPM_CC_CREDENTIAL.MakeCredential, handles: [permanent(handle)], auths: [], params });
  const credentialBlob = res.params.sized16('credentialBlob', 256).slice();
  const encryptedSecret = res.params.sized16('secret', 512).slice();
  res.params.expectEnd('MakeCredential response');
  return { credentialBlob, encryptedSecret };
}

/** Credential blobs inside bounds a TPM takes (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET). */
export function checkCredential(cred: Credential, what: string): Credential {
  if (cred.credentialBlob.length < 4 || cred.credentialBlob.length > 256) throw new VtpmError('EINVAL', `${what}: a credential blob of ${cred.credentialBlob.length} bytes`);
  if (cred.encryptedSecret.length < 1 || cred.encryptedSecret.length > 512) throw new VtpmError('EINVAL', `${what}: an encrypted seed of ${cred.encryptedSecret.length} bytes`);
  return cred;
}
