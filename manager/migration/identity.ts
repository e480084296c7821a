// The host's identity for migration: two keys created inside its hardware TPM under the
// owner storage primary — a signing key (signs the host's part of every migration
// transcript) and an ECDH decryption key (a migration stream is wrapped for it, so only
// this TPM can open one) — and a document binding them: the hardware TPM certifies the
// ECDH key with the signing key (TPM2_Certify, qualified by the host's label), so a peer
// holding the document knows the ECDH key is TPM-resident, fixed to that TPM, and belongs
// to the signing key it trusts (`vtpm host trust add`).
//
// Stored as identity.sealed in the state dir (sealed under the root key): the TPM-wrapped
// private parts, which load only into this TPM, and the document.
import { hostname } from 'node:os';
import { createHash, timingSafeEqual, verify, type KeyObject } from 'node:crypto';
import { encode } from 'cbor-x';
import { join } from 'node:path';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import type { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import {
  TPMA_OBJECT, TPM_ALG, TPM_ECC_NIST_P256, TPM_ST_ATTEST_CERTIFY, ecdsaDer, eccDecryptTemplate, eccPublicKey, eccSigningTemplate, objectName, parseAttest, parsePublic,
  type EccPoint, type PublicArea,
} from '../../drivers/tpm/tpm2-structures.ts';
import { hardwareClient, ownerStoragePrimary, withFlush } from '../hardware/client.ts';
import { asBuffer, bytesField, checkRecord, decodeRecord, FORMAT_VERSION, textField } from '../store/sealed-file.ts';
import { readSealedRecord, writeSealedRecord } from '../store/sealed-record.ts';

const FILE = 'identity.sealed';
const MAX_FILE = 16 * 1024;
export const MAX_DOCUMENT = 4096;
const DOC_KEYS = ['v', 'host', 'signing', 'migration', 'attest', 'signature'] as const;
const HOST_LABEL = /^[\x21-\x7e]{1,64}$/;

interface KeyBlob {
  public: Uint8Array;
  private: Uint8Array;
}

/** A peer's identity document, checked: its label, fingerprint and keys. */
export interface PeerIdentity {
  host: string;
  /** sha256 of the signing key's public area, hex: what trust is keyed on. */
  fingerprint: string;
  signingKey: KeyObject;
  migration: PublicArea;
  /** The document's bytes (hashed into transcripts). */
  document: Uint8Array;
}

export const fingerprintOf = (signingPublic: Uint8Array): string => createHash('sha256').update(signingPublic).digest('hex');
const qualifying = (host: string) => createHash('sha256').update(encode(['vtpm-host-identity', FORMAT_VERSION, host])).digest();

export class HostIdentity {
  private constructor(
    private readonly hw: HardwareTpm,
    private readonly signing: KeyBlob,
    private readonly migration: KeyBlob,
    readonly document: Uint8Array,
    readonly fingerprint: string,
    readonly host: string,
  ) {}

  /** This host's identity: read back, or created in the hardware TPM on first use. */
  static async open(hw: HardwareTpm, stateDir: string, rootKey: Uint8Array, log: (l: string) => void): Promise<HostIdentity> {
    const file = join(stateDir, FILE);
    const stored = readSealedRecord(file, rootKey, 'host identity', MAX_FILE);
    if (stored !== undefined) {
      const what = `the host identity record (${file})`;
      const f = checkRecord(stored, what, ['signing', 'migration', 'document']);
      const blob = (v: unknown, k: string): KeyBlob => {
        const b = checkRecord(v, `${what} ${k} key`, ['public', 'private']);
        return { public: bytesField(b, 'public', what), private: bytesField(b, 'private', what) };
      };
      const document = bytesField(f, 'document', what);
      const peer = verifyIdentity(document);
      return new HostIdentity(hw, blob(f.signing, 'signing'), blob(f.migration, 'migration'), document, peer.fingerprint, peer.host);
    }
    const host = hostname().replace(/[^\x21-\x7e]/g, '').slice(0, 64) || 'host';
    const c = await hardwareClient(hw);
    const made = await withFlush(c, async (loaded) => {
      const primary = await ownerStoragePrimary(c, loaded);
      const signing = await c.create(primary, eccSigningTemplate());
      const migration = await c.create(primary, eccDecryptTemplate());
      const sk = await c.load(primary, signing);
      loaded.push(sk.handle);
      const mk = await c.load(primary, migration);
      loaded.push(mk.handle);
      const cert = await c.certify(mk, sk, qualifying(host));
      const document = encode({ v: FORMAT_VERSION, host, signing: asBuffer(signing.public), migration: asBuffer(migration.public), attest: asBuffer(cert.attest), signature: Buffer.from(ecdsaDer(cert.signature)) });
      return { signing, migration, document };
    });
    const peer = verifyIdentity(made.document); // what a peer will check, checked here first
    writeSealedRecord(file, rootKey, 'host identity', {
      signing: { public: asBuffer(made.signing.public), private: asBuffer(made.signing.private) },
      migration: { public: asBuffer(made.migration.public), private: asBuffer(made.migration.private) },
      document: made.document,
    });
    log(`host identity created in the hardware TPM (fingerprint ${peer.fingerprint})`);
    return new HostIdentity(hw, made.signing, made.migration, made.document, peer.fingerprint, host);
  }

  /** ECDSA-SHA256 over `digest` by the hardware signing key, DER-encoded. */
  sign(digest: Uint8Array): Promise<Uint8Array> {
    return this.withKey(this.signing, async (c, key) => ecdsaDer(await c.sign(key, digest)));
  }

  /** The x coordinate of the ECDH shared point of the migration key and `peer`. */
  zgen(peer: EccPoint): Promise<Uint8Array> {
    return this.withKey(this.migration, async (c, key) => (await c.ecdhZGen(key, peer)).x);
  }

  private async withKey<T>(blob: KeyBlob, body: (c: Tpm2Client, key: { handle: number; name: Uint8Array }) => Promise<T>): Promise<T> {
    const c = await hardwareClient(this.hw);
    return withFlush(c, async (loaded) => {
      const primary = await ownerStoragePrimary(c, loaded);
      const key = await c.load(primary, blob);
      loaded.push(key.handle);
      return body(c, key);
    });
  }
}

/** Check a host identity document as a peer does; EINTEGRITY naming what is wrong. */
export function verifyIdentity(document: Uint8Array): PeerIdentity {
  const what = 'the host identity document';
  const bad = (why: string, cause?: unknown) => new VtpmError('EINTEGRITY', `${what} ${why}`, cause === undefined ? undefined : { cause });
  if (document.length > MAX_DOCUMENT) throw bad(`is ${document.length} bytes (at most ${MAX_DOCUMENT})`);
  const f = decodeRecord(document, what, DOC_KEYS);
  const host = textField(f, 'host', what, 64, HOST_LABEL);
  const signingBytes = bytesField(f, 'signing', what);
  const migrationBytes = bytesField(f, 'migration', what);
  const attest = bytesField(f, 'attest', what);
  const signature = bytesField(f, 'signature', what);
  let signing: PublicArea, migration: PublicArea;
  try {
    signing = parsePublic(signingBytes);
    migration = parsePublic(migrationBytes);
  } catch (e) {
    throw bad('has an unreadable public area', e);
  }
  const a = TPMA_OBJECT;
  const fixed = a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin;
  const p256 = (p: PublicArea) => p.type === TPM_ALG.ECC && p.curve === TPM_ECC_NIST_P256 && p.nameAlg === TPM_ALG.SHA256;
  if (!p256(signing) || (signing.attributes & (fixed | a.sign)) !== (fixed | a.sign) || (signing.attributes & a.decrypt) !== 0) {
    throw bad('has a signing key that is not a TPM-resident P-256 signing key');
  }
  if (!p256(migration) || (migration.attributes & (fixed | a.decrypt)) !== (fixed | a.decrypt) || (migration.attributes & (a.sign | a.restricted)) !== 0) {
    throw bad('has a migration key that is not a TPM-resident P-256 ECDH key');
  }
  let parsed;
  try {
    parsed = parseAttest(attest);
  } catch (e) {
    throw bad('has an unreadable certification', e);
  }
  const eq = (x: Uint8Array, y: Uint8Array) => x.length === y.length && timingSafeEqual(x, y);
  if (parsed.type !== TPM_ST_ATTEST_CERTIFY || !parsed.name || !eq(parsed.name, objectName(migrationBytes, migration.nameAlg))) {
    throw bad('does not certify its migration key');
  }
  if (!eq(parsed.extraData, qualifying(host))) throw bad(`certifies its key for another host than ${host}`);
  const signingKey = eccPublicKey(signing);
  if (!verify('sha256', attest, signingKey, signature)) throw bad('has a certification its signing key did not sign');
  return { host, fingerprint: fingerprintOf(signingBytes), signingKey, migration, document };
}
