// The last link, attestation key → hardware EK, checked the only way a decrypt-only TCG EK
// allows: a challenge. The verifier makes a credential for the trusted EK naming the AK of
// the document (MakeCredential, drivers/tpm/tpm2-credential.ts) around a fresh 32-byte
// secret; the host's TPM returns the secret only if it holds that EK and that AK
// (ActivateCredential, hw-ek.ts). Between the two steps the verifier keeps a state file
// (0600) with the challenge's id, the document and EK it was made for, and a SHA-256
// commitment to the secret, never the secret itself: reading the state file does not let
// anyone answer. A state is consumed by the response that matches it, so a response
// answers one challenge once.
//
// Files: the challenge (CBOR, kind vtpm-credential-challenge; or tpm2-tools'
// tpm2_makecredential output, magic 0xBADCC0DE, which the host side also takes), the
// response (CBOR, kind vtpm-credential-response), the verifier state (CBOR).
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { Reader, Writer } from '../../drivers/tpm/marshal.ts';
import { checkCredential, makeCredential, type Credential } from '../../drivers/tpm/tpm2-credential.ts';
import { asBuffer, bytesField, decodeRecord, FORMAT_VERSION, textField } from '../store/sealed-file.ts';
import { BIND, type TrustedEk } from './verify.ts';

const SECRET_BYTES = 32;
const ID_BYTES = 16;
export const MAX_CHALLENGE = 4096;
const TPM2_TOOLS_MAGIC = 0xbadcc0de;

export interface Challenge {
  format: 'vtpm' | 'tpm2-tools';
  credential: Credential;
  /** vtpm challenges: its id (echoed in the response), the instance and the names it is for. */
  id?: Uint8Array;
  uuid?: string;
  akName?: Uint8Array;
  ekName?: Uint8Array;
}

const sha256 = (...parts: Uint8Array[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return new Uint8Array(h.digest());
};
const commitment = (id: Uint8Array, secret: Uint8Array) => sha256(Buffer.from('vtpm-credential-v1\0', 'latin1'), id, secret);
const eq = (a: Uint8Array, b: Uint8Array) => a.length === b.length && timingSafeEqual(a, b);
const broken = (why: string) => new VtpmError('EINTEGRITY', `broken link: ${BIND}: ${why}`);

/** A challenge for `ek` naming the attestation key `akName` of the document `docBytes`
 *  (instance `uuid`), and the verifier's state for it. */
export function makeChallenge(docBytes: Uint8Array, uuid: string, akName: Uint8Array, ek: TrustedEk): { challenge: Uint8Array; state: Uint8Array } {
  const id = new Uint8Array(randomBytes(ID_BYTES));
  const secret = new Uint8Array(randomBytes(SECRET_BYTES));
  const cred = makeCredential(ek.public, ek.key, akName, secret);
  const committed = commitment(id, secret);
  secret.fill(0);
  const challenge = encode({
    v: FORMAT_VERSION,
    kind: 'vtpm-credential-challenge',
    id: asBuffer(id),
    uuid,
    akName: asBuffer(akName),
    ekName: asBuffer(ek.name),
    credentialBlob: asBuffer(cred.credentialBlob),
    encryptedSecret: asBuffer(cred.encryptedSecret),
  });
  const state = encode({ v: FORMAT_VERSION, kind: 'vtpm-verifier-state', id: asBuffer(id), commitment: asBuffer(committed), doc: asBuffer(sha256(docBytes)), ekName: asBuffer(ek.name), created: new Date().toISOString() });
  return { challenge, state };
}

/** A challenge file: ours, or tpm2_makecredential's (header, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET). */
export function decodeChallenge(bytes: Uint8Array): Challenge {
  const what = 'the challenge';
  if (bytes.length > MAX_CHALLENGE) throw new VtpmError('EINVAL', `${what} is ${bytes.length} bytes (at most ${MAX_CHALLENGE})`);
  if (bytes.length >= 8 && new Reader(bytes).u32('magic') === TPM2_TOOLS_MAGIC) {
    const r = new Reader(bytes, 4);
    const version = r.u32('version');
    if (version !== 1) throw new VtpmError('EINVAL', `${what}: a tpm2-tools credential file of version ${version} (only 1 is known)`);
    const credential = { credentialBlob: r.sized16('credentialBlob', 256).slice(), encryptedSecret: r.sized16('secret', 512).slice() };
    r.expectEnd(what);
    return { format: 'tpm2-tools', credential: checkCredential(credential, what) };
  }
  const f = decodeRecord(bytes, what, ['v', 'kind', 'id', 'uuid', 'akName', 'ekName', 'credentialBlob', 'encryptedSecret']);
  if (f.kind !== 'vtpm-credential-challenge') throw new VtpmError('EINVAL', `${what} is not a vtpm credential challenge (nor a tpm2_makecredential file)`);
  const credential = { credentialBlob: bytesField(f, 'credentialBlob', what), encryptedSecret: bytesField(f, 'encryptedSecret', what) };
  return {
    format: 'vtpm',
    credential: checkCredential(credential, what),
    id: bytesField(f, 'id', what),
    uuid: textField(f, 'uuid', what, 36),
    akName: bytesField(f, 'akName', what),
    ekName: bytesField(f, 'ekName', what),
  };
}

/** tpm2_makecredential's file format, for a credential (interoperability checks). */
export function encodeTpm2ToolsCredential(cred: Credential): Uint8Array {
  return new Writer(cred.credentialBlob.length + cred.encryptedSecret.length + 12).u32(TPM2_TOOLS_MAGIC).u32(1).sized16(cred.credentialBlob).sized16(cred.encryptedSecret).finish();
}

export function encodeResponse(id: Uint8Array, secret: Uint8Array): Uint8Array {
  return encode({ v: FORMAT_VERSION, kind: 'vtpm-credential-response', id: asBuffer(id), secret: asBuffer(secret) });
}

/** Step two: the response answers the challenge of `stateBytes`, made for this document
 *  and this EK. Throws naming the link when it does not. */
export function checkResponse(stateBytes: Uint8Array, docBytes: Uint8Array, ek: TrustedEk, responseBytes: Uint8Array): void {
  const s = decodeRecord(stateBytes, 'the verifier state', ['v', 'kind', 'id', 'commitment', 'doc', 'ekName', 'created']);
  if (s.kind !== 'vtpm-verifier-state') throw new VtpmError('EINVAL', 'the verifier state file is not a vtpm verifier state');
  if (!eq(bytesField(s, 'doc', 'the verifier state'), sha256(docBytes))) throw new VtpmError('EINVAL', 'the pending challenge was made for another attestation document');
  if (!eq(bytesField(s, 'ekName', 'the verifier state'), ek.name)) throw new VtpmError('EINVAL', 'the pending challenge was made for another --hw-ek key');
  if (responseBytes.length > MAX_CHALLENGE) throw broken(`the response is ${responseBytes.length} bytes (at most ${MAX_CHALLENGE})`);
  let r;
  try {
    r = decodeRecord(responseBytes, 'the response', ['v', 'kind', 'id', 'secret']);
  } catch (e) {
    throw new VtpmError('EINTEGRITY', `broken link: ${BIND}: the response is damaged`, { cause: e });
  }
  if (r.kind !== 'vtpm-credential-response') throw broken('the response is not a vtpm credential response');
  if (!eq(bytesField(r, 'id', 'the response'), bytesField(s, 'id', 'the verifier state'))) throw broken('the response answers another challenge (replayed or stale)');
  const secret = bytesField(r, 'secret', 'the response');
  if (!eq(commitment(bytesField(s, 'id', 'the verifier state'), secret), bytesField(s, 'commitment', 'the verifier state'))) {
    throw broken("the secret in the response is not the challenge's: the TPM holding the --hw-ek EK did not activate it (the attestation key is not in that TPM, or the response was altered)");
  }
}
