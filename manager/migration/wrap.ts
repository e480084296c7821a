// The cryptography of one migration stream. The source makes a fresh P-256 key pair, and
// the shared secret of it with the destination's TPM-resident ECDH key (the destination
// gets the same secret from TPM2_ECDH_ZGen, so only that TPM can open the stream) keys
// AES-256-GCM through HKDF-SHA256. Everything the two sides agree on — both identity
// documents, the destination's fresh nonce, the instance's uuid, name and TPM family, the
// ephemeral key, the ciphertext's size and iv — is hashed into the transcript: it salts
// the key, is the cipher's associated data, and is what each side signs with its hardware
// signing key (the source's offer; the destination's acknowledgement).
import { createECDH, createHash, hkdfSync, verify, type KeyObject } from 'node:crypto';
import { encode } from 'cbor-x';
import type { EccPoint } from '../../drivers/tpm/tpm2-structures.ts';
import { VtpmError } from '../../drivers/base/errors.ts';
import { MIGRATION_PROTOCOL } from './channel.ts';

export interface TranscriptParts {
  source: Uint8Array;
  destination: Uint8Array;
  nonce: Uint8Array;
  uuid: string;
  name: string;
  tpm: string;
  created: number;
  eph: EccPoint;
  size: number;
  iv: Uint8Array;
}

const sha256 = (...parts: Uint8Array[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

export function transcriptHash(p: TranscriptParts): Buffer {
  return sha256(encode(['vtpm-migrate', MIGRATION_PROTOCOL, sha256(p.source), sha256(p.destination), Buffer.from(p.nonce), p.uuid, p.name, p.tpm, p.created, Buffer.from(p.eph.x), Buffer.from(p.eph.y), p.size, Buffer.from(p.iv)]));
}

/** What the destination signs once the instance runs there: the source may then drop its copy. */
export const ackMessage = (th: Uint8Array): Buffer => encode(['vtpm-migrate-ack', MIGRATION_PROTOCOL, Buffer.from(th)]);

/** What a destination signs when asked whether it holds an instance (recovery). */
export const answerMessage = (uuid: string, nonce: Uint8Array, has: boolean): Buffer => encode(['vtpm-migrate-answer', MIGRATION_PROTOCOL, uuid, Buffer.from(nonce), has]);

/** What the source signs: its offer's transcript. */
export const offerMessage = (th: Uint8Array): Buffer => encode(['vtpm-migrate-offer', MIGRATION_PROTOCOL, Buffer.from(th)]);

/** The digest a hardware key signs for `message` (TPM2_Sign takes the digest). */
export const digestOf = (message: Uint8Array): Buffer => sha256(message);

/** The source's side: a fresh key pair and the stream key for the peer's migration point. */
export function ephemeralFor(peer: EccPoint): { eph: EccPoint; z: Buffer } {
  const ecdh = createECDH('prime256v1');
  const pub = ecdh.generateKeys();
  const z = ecdh.computeSecret(Buffer.concat([Buffer.from([4]), Buffer.from(peer.x), Buffer.from(peer.y)]));
  return { eph: { x: pub.subarray(1, 33), y: pub.subarray(33, 65) }, z };
}

export function streamKey(z: Uint8Array, th: Uint8Array): Buffer {
  return Buffer.from(hkdfSync('sha256', z, th, 'vtpm-migrate-stream-key', 32));
}

/** ECDSA-SHA256 of `message` by `key` (a peer's hardware signing key), else EINTEGRITY. */
export function checkSignature(key: KeyObject, message: Uint8Array, signature: Uint8Array, what: string): void {
  let ok = false;
  try {
    ok = verify('sha256', message, key, signature);
  } catch {
    ok = false; // a malformed DER signature is a bad signature
  }
  if (!ok) throw new VtpmError('EINTEGRITY', `${what}: the signature does not verify with the trusted host's key`);
}
