// The state store's one cipher: AES-256-GCM (node:crypto), a fresh random 12-byte IV per
// seal, a 16-byte tag, and associated data that says what the bytes are (which instance,
// which blob, which version, which table epoch), so a ciphertext moved to another place
// fails to open. Keys are never logged nor put into an error message.
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { VtpmError } from '../../drivers/base/errors.ts';

export const KEY_BYTES = 32;
export const IV_BYTES = 12;
export const TAG_BYTES = 16;
const ALG = 'aes-256-gcm';

/** What a seal produces; each part is stored beside the others in an envelope. */
export interface Sealed {
  iv: Uint8Array;
  ct: Uint8Array;
  tag: Uint8Array;
}

/** A new random 32-byte key (an instance key, a root key in tests). */
export function newKey(): Buffer {
  return randomBytes(KEY_BYTES);
}

/** Refuse a key of the wrong length (EINVAL); the message names the key, never its bytes. */
export function checkKey(key: Uint8Array, what: string): void {
  if (!(key instanceof Uint8Array) || key.length !== KEY_BYTES) {
    throw new VtpmError('EINVAL', `${what} must be ${KEY_BYTES} bytes, got ${key instanceof Uint8Array ? key.length : typeof key}`);
  }
}

/** Encrypt and authenticate `plaintext`, binding `aad`. The ciphertext has the plaintext's length. */
export function seal(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): { iv: Buffer; ct: Buffer; tag: Buffer } {
  const iv = randomBytes(IV_BYTES);
  const c = createCipheriv(ALG, key, iv, { authTagLength: TAG_BYTES });
  c.setAAD(aad);
  const ct = c.update(plaintext);
  const rest = c.final(); // empty for GCM (a stream mode); checked, not concatenated
  if (rest.length !== 0) throw new VtpmError('EINVAL', `${ALG} returned ${rest.length} trailing bytes`);
  return { iv, ct, tag: c.getAuthTag() };
}

/** Decrypt `sealed` if it authenticates under `key` with `aad`, else EINTEGRITY (`what`
 *  names the thing in the message). The lengths of iv and tag are checked here too. */
export function open(key: Uint8Array, sealed: Sealed, aad: Uint8Array, what: string): Buffer {
  if (sealed.iv.length !== IV_BYTES || sealed.tag.length !== TAG_BYTES) {
    throw new VtpmError('EINTEGRITY', `${what}: iv of ${sealed.iv.length} or tag of ${sealed.tag.length} bytes (want ${IV_BYTES} and ${TAG_BYTES})`);
  }
  try {
    const d = createDecipheriv(ALG, key, sealed.iv, { authTagLength: TAG_BYTES });
    d.setAAD(aad);
    d.setAuthTag(sealed.tag);
    const pt = d.update(sealed.ct);
    d.final();
    return pt;
  } catch (e) {
    throw new VtpmError('EINTEGRITY', `${what} failed authentication: it was altered, is damaged, belongs elsewhere, or the key is wrong`, { cause: e });
  }
}
