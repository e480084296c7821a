// The attestation document (`vtpm attest`) and its offline checks as a remote verifier
// does them (`vtpm verify`), from nothing but the document. The chain, link by link:
//   1. vTPM EK certificate(s) and platform certificate  — signed by the host CA key
//   2. host CA certificate — self-signed by, and for, the key the hardware TPM certified
//   3. hardware evidence — TPM2_Certify of that key (fixedTPM, made in the TPM) by the
//      hardware TPM's restricted endorsement attestation key (AK), naming this CA certificate
//   4. AK → hardware EK — not checkable offline: the AK is bound to the TCG EK the verifier
//      trusts (`--hw-ek`) by credential activation (challenge.ts).
// Every failure is EINTEGRITY with the link named in plain words.
import { createHash, createPublicKey, timingSafeEqual, verify, X509Certificate, type KeyObject } from 'node:crypto';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { TPMA_OBJECT, TPM_ALG, TPM_ECC_NIST_P256, TPM_ST_ATTEST_CERTIFY, eccPublicKey, objectName, parseAttest, parsePublic, type PublicArea } from '../../drivers/tpm/tpm2-structures.ts';
import { asBuffer, bytesField, checkRecord, decodeRecord, FORMAT_VERSION, textField } from '../store/sealed-file.ts';
import { rsaEkPublicFromKey } from './ek.ts';
import { parsePlatformCertificate } from './x509.ts';

/** TPM2_Certify of the host CA key by the hardware TPM's endorsement attestation key. */
export interface CaEvidence {
  /** The endorsement attestation key's TPMT_PUBLIC. */
  akPublic: Uint8Array;
  /** The host CA key's TPMT_PUBLIC (its name is what the TPM certified). */
  caPublic: Uint8Array;
  /** TPMS_ATTEST as the TPM produced it, and its ECDSA signature (DER). */
  attest: Uint8Array;
  signature: Uint8Array;
}

export interface EkEntry {
  kind: 'rsa' | 'ecc';
  /** The NV index the certificate is stored at in the vTPM. */
  index: number;
  certificate: Uint8Array;
}

export interface AttestationDoc {
  instance: { name: string; uuid: string; tpm: '1.2' | '2.0' };
  ek: EkEntry[];
  platform?: Uint8Array;
  ca: Uint8Array;
  evidence: CaEvidence;
}

const MAX_DOC = 64 * 1024;

/** The qualifying data of the CA key's certification: it names the CA certificate. */
export function caQualifier(certificate: Uint8Array): Uint8Array {
  return new Uint8Array(createHash('sha256').update('vtpm-host-ca-v1\0').update(certificate).digest());
}
const EK_EKU = '2.23.133.8.1';

export function encodeAttestation(d: AttestationDoc): Uint8Array {
  return encode({
    v: FORMAT_VERSION,
    kind: 'vtpm-attestation',
    instance: d.instance,
    ek: d.ek.map((e) => ({ kind: e.kind, index: e.index, certificate: asBuffer(e.certificate) })),
    ...(d.platform ? { platform: asBuffer(d.platform) } : {}),
    ca: asBuffer(d.ca),
    evidence: { akPublic: asBuffer(d.evidence.akPublic), caPublic: asBuffer(d.evidence.caPublic), attest: asBuffer(d.evidence.attest), signature: asBuffer(d.evidence.signature) },
  });
}

export function decodeAttestation(bytes: Uint8Array): AttestationDoc {
  const what = 'the attestation document';
  if (bytes.length > MAX_DOC) throw new VtpmError('EINTEGRITY', `${what} is ${bytes.length} bytes (at most ${MAX_DOC})`);
  const f = decodeRecord(bytes, what, ['v', 'kind', 'instance', 'ek', 'ca', 'evidence'], ['platform']);
  if (f.kind !== 'vtpm-attestation') throw new VtpmError('EINTEGRITY', `${what} is not a vtpm attestation`);
  const i = checkRecord(f.instance, `${what} instance`, ['name', 'uuid', 'tpm']);
  const tpm = i.tpm === '1.2' || i.tpm === '2.0' ? i.tpm : undefined;
  if (!tpm) throw new VtpmError('EINTEGRITY', `${what}: TPM family ${String(i.tpm).slice(0, 8)}`);
  if (!Array.isArray(f.ek) || f.ek.length > 4) throw new VtpmError('EINTEGRITY', `${what}: ek is not a list of at most 4`);
  const ek = f.ek.map((v: unknown) => {
    const e = checkRecord(v, `${what} EK entry`, ['kind', 'index', 'certificate']);
    if ((e.kind !== 'rsa' && e.kind !== 'ecc') || typeof e.index !== 'number') throw new VtpmError('EINTEGRITY', `${what}: an EK entry of unknown kind`);
    return { kind: e.kind, index: e.index, certificate: bytesField(e, 'certificate', what) } as EkEntry;
  });
  const ev = checkRecord(f.evidence, `${what} evidence`, ['akPublic', 'caPublic', 'attest', 'signature']);
  return {
    instance: { name: textField(i, 'name', what, 32), uuid: textField(i, 'uuid', what, 36), tpm },
    ek,
    ...(f.platform !== undefined ? { platform: bytesField(f, 'platform', what) } : {}),
    ca: bytesField(f, 'ca', what),
    evidence: { akPublic: bytesField(ev, 'akPublic', what), caPublic: bytesField(ev, 'caPublic', what), attest: bytesField(ev, 'attest', what), signature: bytesField(ev, 'signature', what) },
  };
}

const broken = (link: string, why: string, cause?: unknown) => new VtpmError('EINTEGRITY', `broken link: ${link}: ${why}`, cause === undefined ? undefined : { cause });
const eq = (a: Uint8Array, b: Uint8Array) => a.length === b.length && timingSafeEqual(a, b);
const spki = (k: KeyObject) => new Uint8Array(k.export({ type: 'spki', format: 'der' }));
const HW = 'hardware evidence (host CA key → attestation key)';
export const BIND = 'attestation key → hardware EK';
const CA = 'host CA certificate';

function parseArea(bytes: Uint8Array, link: string, what: string): PublicArea {
  try {
    return parsePublic(bytes);
  } catch (e) {
    throw broken(link, `${what} is unreadable`, e);
  }
}

export interface TrustedEk {
  key: KeyObject;
  /** The TPMT_PUBLIC rebuilt from the key and template L-1, and the EK's name. */
  public: Uint8Array;
  name: Uint8Array;
}

/** The trusted hardware EK: an RSA 2048 public key (PEM or DER SubjectPublicKeyInfo, e.g.
 *  `vtpm hw info --ek-out`, `tpm2_createek -G rsa -f pem`, an EK certificate's key) of a
 *  TCG default EK (template L-1). */
export function parseHwEk(bytes: Uint8Array): TrustedEk {
  const text = Buffer.from(bytes).toString('latin1');
  if (text.includes('-----BEGIN TPM2 PUBLIC-----')) {
    throw new VtpmError('EINVAL', '--hw-ek holds an endorsement attestation key (the old enrolment format): enrol the TCG EK with vtpm hw info --ek-out');
  }
  let key: KeyObject;
  try {
    key = text.includes('-----BEGIN') ? createPublicKey(text) : createPublicKey({ key: Buffer.from(bytes), format: 'der', type: 'spki' });
  } catch (e) {
    throw new VtpmError('EINVAL', '--hw-ek is not a public key (PEM or DER SubjectPublicKeyInfo)', { cause: e });
  }
  let area: Uint8Array;
  try {
    area = rsaEkPublicFromKey(key);
  } catch (e) {
    throw new VtpmError('EINVAL', `--hw-ek is not a TCG RSA EK public key: ${(e as Error).message}`, { cause: e });
  }
  return { key, public: area, name: objectName(area, TPM_ALG.SHA256) };
}

/** Links 3 and 2: the CA certificate's key is a TPM-held key the attestation key in the
 *  evidence certified. Returns the CA certificate for link 1 and the AK's name (link 4). */
export function verifyHostCa(caDer: Uint8Array, ev: CaEvidence): { cert: X509Certificate; akName: Uint8Array } {
  const ak = parseArea(ev.akPublic, HW, 'the attestation key');
  const trusted = ak.type === TPM_ALG.ECC && ak.curve === TPM_ECC_NIST_P256 ? eccPublicKey(ak) : undefined;
  if (!trusted) throw broken(HW, 'the attestation key is not an ECDSA P-256 key');
  // Its name is what the challenge binds to the EK: a weak name hash would let another key pass for it.
  if (ak.nameAlg !== TPM_ALG.SHA256) throw broken(HW, 'the attestation key is not named with SHA-256');
  const a = TPMA_OBJECT;
  const bound = a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin;
  if ((ak.attributes & (bound | a.restricted | a.sign)) !== (bound | a.restricted | a.sign)) throw broken(HW, 'the attestation key is not a restricted, TPM-bound signing key');
  if (!verify('sha256', ev.attest, trusted, ev.signature)) throw broken(HW, 'the signature over the certification of the host CA key does not verify with the attestation key');
  let parsed;
  try {
    parsed = parseAttest(ev.attest);
  } catch (e) {
    throw broken(HW, 'the certification is not a TPM-generated TPMS_ATTEST', e);
  }
  const ca = parseArea(ev.caPublic, HW, 'the host CA key');
  if (parsed.type !== TPM_ST_ATTEST_CERTIFY || !parsed.name || !eq(parsed.name, objectName(ev.caPublic, ca.nameAlg))) throw broken(HW, 'the hardware TPM certified another key than the host CA key');
  if ((ca.attributes & (bound | a.sign)) !== (bound | a.sign) || (ca.attributes & a.decrypt) !== 0) throw broken(HW, 'the host CA key is not a signing key created in, and fixed to, the hardware TPM');
  if (!eq(parsed.extraData, caQualifier(caDer))) throw broken(HW, 'the certification names another host CA certificate (a byte of the CA certificate differs)');
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(caDer);
  } catch (e) {
    throw broken(CA, 'the certificate is damaged (not DER X.509)', e);
  }
  if (!eq(spki(cert.publicKey), spki(eccPublicKey(ca)))) throw broken(CA, 'its public key is not the key the hardware TPM certified');
  if (!cert.ca) throw broken(CA, 'it is not a CA certificate');
  if (!cert.verify(cert.publicKey)) throw broken(CA, 'its self-signature does not verify');
  return { cert, akName: objectName(ev.akPublic, ak.nameAlg) };
}

export interface VerifyResult {
  instance: AttestationDoc['instance'];
  ek: { kind: string; index: string; subject: string; fingerprint: string }[];
  ca: string;
  platform: boolean;
  /** The attestation key's name (hex): what a credential challenge names. */
  akName: string;
}

/** Links 1-3 of `doc` (every link but the AK's binding to the hardware EK); `guestEk`: an
 *  EK public key a guest reported, which must be one of the certified EKs. */
export function verifyAttestation(doc: AttestationDoc, guestEk?: KeyObject): VerifyResult {
  const { cert: ca, akName } = verifyHostCa(doc.ca, doc.evidence);
  if (doc.ek.length === 0) throw broken('vTPM EK certificate → host CA', 'the document holds no EK certificate');
  const eks = doc.ek.map((e) => {
    const link = `vTPM EK certificate (${e.kind.toUpperCase()}) → host CA`;
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(e.certificate);
    } catch (err) {
      throw broken(link, 'the certificate is damaged (not DER X.509)', err);
    }
    if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw broken(link, 'it was not signed by the host CA key');
    if (!cert.keyUsage?.includes(EK_EKU)) throw broken(link, 'it is not an EK certificate (no tcg-kp-EKCertificate usage)');
    if (!cert.subject.includes(doc.instance.uuid)) throw broken(link, `it is for another vTPM than ${doc.instance.uuid}`);
    return { e, cert };
  });
  if (doc.platform) {
    const link = 'platform certificate → host CA';
    let p;
    try {
      p = parsePlatformCertificate(doc.platform);
    } catch (err) {
      throw broken(link, 'the certificate is damaged (not a DER attribute certificate)', err);
    }
    if (!verify('sha256', p.tbs, ca.publicKey, p.signature)) throw broken(link, 'it was not signed by the host CA key');
    if (!eks.some(({ cert }) => cert.serialNumber.toLowerCase().replace(/^0+/, '') === p.holderSerial.replace(/^0+/, ''))) throw broken(link, "its holder is not this vTPM's EK certificate");
  }
  if (guestEk && !eks.some(({ cert }) => eq(spki(cert.publicKey), spki(guestEk)))) {
    throw broken('guest EK → vTPM EK certificate', "the guest's EK public key is not the key of any EK certificate in the document");
  }
  return {
    instance: doc.instance,
    ek: eks.map(({ e, cert }) => ({ kind: e.kind, index: `0x${e.index.toString(16).padStart(8, '0')}`, subject: cert.subject.replace(/\n/g, ', '), fingerprint: cert.fingerprint256 })),
    ca: ca.subject.replace(/\n/g, ', '),
    platform: doc.platform !== undefined,
    akName: Buffer.from(akName).toString('hex'),
  };
}
