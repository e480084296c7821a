// TPM 2.0 authorisation sessions (Part 1 §19 and §21): the session key from a salt, the
// command and response HMACs over cpHash/rpHash, and AES-CFB parameter encryption of the
// first TPM2B parameter. Node's crypto does the primitives.
import { createCipheriv, createDecipheriv, createECDH, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { VtpmError } from '../base/errors.ts';
import { Writer } from './marshal.ts';
import { type PublicArea, TPM_ALG, TPM_ECC_NIST_P256, digestSize, hash, hashName } from './tpm2-structures.ts';

export const TPM_SE = { HMAC: 0x00, POLICY: 0x01, TRIAL: 0x03 } as const;
export const TPMA_SESSION = { continueSession: 0x01, decrypt: 0x20, encrypt: 0x40 } as const;

const u32 = (v: number) => new Writer(4).u32(v).finish();
const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
const label = (s: string) => new Uint8Array(Buffer.from(`${s}\0`, 'latin1'));

/** KDFa (SP800-108 counter mode with HMAC), Part 1 §11.4.10.2. Labels end with a 0 byte. */
export function kdfa(hashAlg: number, key: Uint8Array, use: string, contextU: Uint8Array, contextV: Uint8Array, bits: number): Uint8Array {
  const out: Uint8Array[] = [];
  let have = 0;
  for (let i = 1; have * 8 < bits; i++) {
    const h = createHmac(hashName(hashAlg), key).update(u32(i)).update(label(use)).update(contextU).update(contextV).update(u32(bits)).digest();
    out.push(h);
    have += h.length;
  }
  return cat(...out).subarray(0, (bits + 7) >> 3);
}

/** KDFe (SP800-56A concatenation KDF), Part 1 §11.4.10.3, for ECDH salts. */
export function kdfe(hashAlg: number, z: Uint8Array, use: string, partyU: Uint8Array, partyV: Uint8Array, bits: number): Uint8Array {
  const out: Uint8Array[] = [];
  let have = 0;
  for (let i = 1; have * 8 < bits; i++) {
    const h = hash(hashAlg, u32(i), z, label(use), partyU, partyV);
    out.push(h);
    have += h.length;
  }
  return cat(...out).subarray(0, (bits + 7) >> 3);
}

/** An ECDH salt for StartAuthSession against an ECC tpmKey: the salt and the ephemeral point. */
export function eccSalt(tpmKey: PublicArea): { salt: Uint8Array; encryptedSalt: Uint8Array } {
  if (tpmKey.type !== TPM_ALG.ECC || tpmKey.curve !== TPM_ECC_NIST_P256 || !tpmKey.point) {
    throw new VtpmError('EINVAL', 'salting needs a P-256 tpmKey');
  }
  const ecdh = createECDH('prime256v1');
  ecdh.generateKeys();
  const qe = ecdh.getPublicKey(); // 04 || x || y
  const z = new Uint8Array(ecdh.computeSecret(Buffer.concat([Buffer.from([4]), tpmKey.point.x, tpmKey.point.y])));
  const qex = new Uint8Array(qe.subarray(1, 33));
  const salt = kdfe(tpmKey.nameAlg, z, 'SECRET', qex, tpmKey.point.x, digestSize(tpmKey.nameAlg) * 8);
  const encryptedSalt = new Writer(70).sized16(qex).sized16(new Uint8Array(qe.subarray(33, 65))).finish();
  return { salt, encryptedSalt };
}

export class AuthSession {
  /** Latest nonce from the TPM (nonceOlder for our next command). */
  nonceTPM: Uint8Array;
  nonceCaller: Uint8Array;
  /** Attributes sent with each command (continueSession is always kept). */
  attributes: number;
  /** Set by PolicyAuthValue/PolicyPassword; a plain policy session leaves the authValue out. */
  authValueNeeded = false;

  constructor(
    readonly handle: number,
    readonly type: number,
    readonly hashAlg: number,
    readonly sessionKey: Uint8Array,
    nonceCaller: Uint8Array,
    nonceTPM: Uint8Array,
    readonly symmetric: boolean,
    attributes = TPMA_SESSION.continueSession,
  ) {
    this.nonceCaller = nonceCaller;
    this.nonceTPM = nonceTPM;
    this.attributes = attributes | TPMA_SESSION.continueSession;
  }

  get isPolicy(): boolean {
    return this.type !== TPM_SE.HMAC;
  }

  /** sessionKey || authValue of the authorised entity, as Part 1 §19.6.8 defines the key. */
  private hmacKey(authValue: Uint8Array): Uint8Array {
    const withAuth = !this.isPolicy || this.authValueNeeded;
    return withAuth ? cat(this.sessionKey, trimAuth(authValue)) : this.sessionKey;
  }

  /** A fresh nonceCaller for the next command (each command carries its own). */
  rollNonce(): void {
    this.nonceCaller = new Uint8Array(randomBytes(digestSize(this.hashAlg)));
  }

  commandHmac(cpHash: Uint8Array, authValue: Uint8Array): Uint8Array {
    return new Uint8Array(
      createHmac(hashName(this.hashAlg), this.hmacKey(authValue)).update(cpHash).update(this.nonceCaller).update(this.nonceTPM).update(new Uint8Array([this.attributes])).digest(),
    );
  }

  /** Check the response HMAC (over rpHash) and take the TPM's new nonce. */
  checkResponse(rpHash: Uint8Array, nonceTPM: Uint8Array, attrs: number, hmac: Uint8Array, authValue: Uint8Array): void {
    const key = this.hmacKey(authValue);
    const want = new Uint8Array(createHmac(hashName(this.hashAlg), key).update(rpHash).update(nonceTPM).update(this.nonceCaller).update(new Uint8Array([attrs])).digest());
    // A policy session without any key sends and gets an empty HMAC.
    const ok = key.length === 0 ? hmac.length === 0 || eq(hmac, want) : eq(hmac, want);
    if (!ok) throw new VtpmError('EPROTO', `response HMAC of session 0x${this.handle.toString(16)} does not verify`);
    this.nonceTPM = nonceTPM.slice();
  }

  /** CFB key and IV for parameter encryption, newer nonce first (§21.3). */
  private cfb(authValue: Uint8Array, newer: Uint8Array, older: Uint8Array): { key: Uint8Array; iv: Uint8Array } {
    if (!this.symmetric) throw new VtpmError('EINVAL', 'session has no symmetric algorithm for parameter encryption');
    const km = kdfa(this.hashAlg, cat(this.sessionKey, trimAuth(authValue)), 'CFB', newer, older, 128 + 128);
    return { key: km.subarray(0, 16), iv: km.subarray(16, 32) };
  }

  /** Encrypt the first command parameter's data (after nonceCaller was rolled). */
  encryptCommand(data: Uint8Array, authValue: Uint8Array): Uint8Array {
    const { key, iv } = this.cfb(authValue, this.nonceCaller, this.nonceTPM);
    const c = createCipheriv('aes-128-cfb', key, iv);
    return new Uint8Array(Buffer.concat([c.update(data), c.final()]));
  }

  /** Decrypt the first response parameter's data (after nonceTPM was updated). */
  decryptResponse(data: Uint8Array, authValue: Uint8Array): Uint8Array {
    const { key, iv } = this.cfb(authValue, this.nonceTPM, this.nonceCaller);
    const d = createDecipheriv('aes-128-cfb', key, iv);
    return new Uint8Array(Buffer.concat([d.update(data), d.final()]));
  }
}

/** authValues are used without trailing zero bytes (Part 1 §19.6.4.3). */
function trimAuth(a: Uint8Array): Uint8Array {
  let n = a.length;
  while (n > 0 && a[n - 1] === 0) n--;
  return a.subarray(0, n);
}

function eq(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
