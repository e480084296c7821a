// X.509 certificates signed by a key the hardware TPM holds. @peculiar/x509 builds and
// encodes them; its signing goes through a WebCrypto `Crypto` whose subtle.sign, for a
// key made by hardwareKey(), hashes the to-be-signed bytes and has the hardware TPM sign
// the digest (TPM2_Sign, ECDSA P-256), handing back r||s as WebCrypto does (the library
// turns that into the DER ECDSA-Sig-Value). Every other subtle call is Node's WebCrypto.
// The platform certificate is an attribute certificate (RFC 5755) built with the same
// library family's ASN.1 schema (@peculiar/asn1-x509-attr).
// @peculiar/x509's dependency injection (tsyringe) needs the Reflect metadata API first.
import 'reflect-metadata';
import { createHash, randomBytes, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';
import { AsnConvert } from '@peculiar/asn1-schema';
import { AlgorithmIdentifier, Attribute, GeneralName, GeneralNames, Name as AsnName } from '@peculiar/asn1-x509';
import { AttCertIssuer, AttCertValidityPeriod, AttributeCertificate, AttributeCertificateInfo, Holder, IssuerSerial, V2Form } from '@peculiar/asn1-x509-attr';
import { Utf8String, fromBER } from 'asn1js';
import { VtpmError } from '../../drivers/base/errors.ts';
import { ecdsaDer, type Signature } from '../../drivers/tpm/tpm2-structures.ts';

/** Signs a SHA-256 digest with the hardware-held P-256 key. */
export type DigestSigner = (digest: Uint8Array) => Promise<Signature>;

const signers = new WeakMap<object, DigestSigner>();
const ECDSA_P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const ECDSA_SHA256_OID = '1.2.840.10045.4.3.2';

/** A CryptoKey stand-in whose private half stays in the hardware TPM. */
export function hardwareKey(sign: DigestSigner): CryptoKey {
  const key = { type: 'private', extractable: false, algorithm: ECDSA_P256, usages: ['sign'] };
  signers.set(key, sign);
  return key as unknown as CryptoKey;
}

const fixed32 = (b: Uint8Array) => {
  if (b.length > 32) throw new VtpmError('EINVAL', `ECDSA P-256 component of ${b.length} bytes`);
  const out = new Uint8Array(32);
  out.set(b, 32 - b.length);
  return out;
};

async function hardwareSign(alg: unknown, key: CryptoKey, data: BufferSource): Promise<ArrayBuffer> {
  const sign = signers.get(key as object);
  if (!sign) return webcrypto.subtle.sign(alg as webcrypto.AlgorithmIdentifier, key as webcrypto.CryptoKey, data) as Promise<ArrayBuffer>;
  const hash = (alg as { hash?: string | { name?: string } }).hash;
  const hashName = typeof hash === 'string' ? hash : hash?.name;
  if ((alg as { name?: string }).name !== 'ECDSA' || hashName !== 'SHA-256') throw new VtpmError('EINVAL', `the hardware key signs ECDSA SHA-256 only, not ${JSON.stringify(alg)}`);
  const bytes = ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data);
  const sig = await sign(new Uint8Array(createHash('sha256').update(bytes).digest()));
  const out = new Uint8Array(64); // its own buffer: a small Buffer's .buffer is a shared pool
  out.set(fixed32(sig.r), 0);
  out.set(fixed32(sig.s), 32);
  return out.buffer;
}

const subtle = new Proxy(webcrypto.subtle, {
  get(target, prop) {
    if (prop === 'sign') return hardwareSign;
    const v = Reflect.get(target, prop) as unknown;
    return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
  },
});
/** Node's WebCrypto with sign routed to the hardware for hardwareKey() keys. */
export const hardwareCrypto = {
  subtle,
  getRandomValues: <T extends ArrayBufferView | null>(a: T): T => webcrypto.getRandomValues(a as never) as T,
  randomUUID: () => webcrypto.randomUUID(),
} as unknown as Crypto;

export interface CaParams {
  subject: string;
  publicKeySpki: Uint8Array;
  signer: DigestSigner;
  years?: number;
}

const serial = () => {
  const b = randomBytes(16);
  b[0]! &= 0x7f; // a positive INTEGER
  b[0]! |= 0x01;
  return b.toString('hex');
};
const yearsFrom = (d: Date, years: number) => new Date(Date.UTC(d.getUTCFullYear() + years, d.getUTCMonth(), d.getUTCDate()));
const ab = (u: Uint8Array) => u.buffer.slice(u.byteOffset, u.byteOffset + u.byteLength) as ArrayBuffer;

/** The host CA's self-signed certificate (its key in the hardware TPM). */
export async function issueCaCertificate(p: CaParams): Promise<Uint8Array> {
  const notBefore = new Date();
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: serial(),
      subject: p.subject,
      issuer: p.subject,
      notBefore,
      notAfter: yearsFrom(notBefore, p.years ?? 20),
      publicKey: ab(p.publicKeySpki),
      signingKey: hardwareKey(p.signer),
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' } as EcdsaParams,
      extensions: [
        new x509.BasicConstraintsExtension(true, 1, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
        await x509.SubjectKeyIdentifierExtension.create(ab(p.publicKeySpki), false, hardwareCrypto),
      ],
    },
    hardwareCrypto,
  );
  return new Uint8Array(cert.rawData);
}

/** TCG OIDs (EK Credential Profile §3.2). */
const TCG = { manufacturer: '2.23.133.2.1', model: '2.23.133.2.2', version: '2.23.133.2.3', ekCertificate: '2.23.133.8.1' };
/** The vTPM's "manufacturer" as a TPM vendor id, the way libtpms reports it (IBM). */
const TPM_MANUFACTURER = 'id:49424D00';

export interface EkCertParams {
  ca: { certificate: Uint8Array; signer: DigestSigner };
  ekSpki: Uint8Array;
  kind: 'rsa' | 'ecc';
  tpm: '1.2' | '2.0';
  uuid: string;
  host: string;
}

/** An EK certificate as a TPM maker issues it: empty-ish subject, the TPM named in a
 *  critical subjectAltName, keyEncipherment (RSA) / keyAgreement (ECC), the EK EKU. */
export async function issueEkCertificate(p: EkCertParams): Promise<Uint8Array> {
  const ca = new x509.X509Certificate(ab(p.ca.certificate));
  const notBefore = new Date();
  const tpmVersion = p.tpm === '2.0' ? 'id:00020000' : 'id:00010002';
  const san = new x509.SubjectAlternativeNameExtension([{ type: 'dn', value: `${TCG.manufacturer}=${TPM_MANUFACTURER}, ${TCG.model}=vtpm, ${TCG.version}=${tpmVersion}` }], true);
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: serial(),
      // The vTPM instance and its host, so a verifier reads which guest's TPM this is.
      subject: `CN=vTPM EK ${p.kind.toUpperCase()} ${p.uuid}, OU=${p.host}, O=vtpm`,
      issuer: ca.subjectName,
      notBefore,
      notAfter: yearsFrom(notBefore, 20),
      publicKey: ab(p.ekSpki),
      signingKey: hardwareKey(p.ca.signer),
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' } as EcdsaParams,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(p.kind === 'rsa' ? x509.KeyUsageFlags.keyEncipherment : x509.KeyUsageFlags.keyAgreement, true),
        new x509.ExtendedKeyUsageExtension([TCG.ekCertificate], false),
        san,
        await x509.AuthorityKeyIdentifierExtension.create(ca, false, hardwareCrypto),
      ],
    },
    hardwareCrypto,
  );
  return new Uint8Array(cert.rawData);
}

/** TCG Platform Certificate attribute OIDs (Platform Certificate Profile §3.1). */
const PLATFORM = { manufacturer: '2.23.133.5.1.1', model: '2.23.133.5.1.4', version: '2.23.133.5.1.5', serial: '2.23.133.5.1.6' };

/** A platform attribute certificate naming the host, held by the vTPM's EK certificate. */
export async function issuePlatformCertificate(p: { ca: { certificate: Uint8Array; signer: DigestSigner }; ekCertificate: Uint8Array; host: string; hostId: string }): Promise<Uint8Array> {
  const ca = new x509.X509Certificate(ab(p.ca.certificate));
  const ek = new x509.X509Certificate(ab(p.ekCertificate));
  const caName = AsnConvert.parse(ca.subjectName.toArrayBuffer(), AsnName);
  const ekIssuer = AsnConvert.parse(ek.issuerName.toArrayBuffer(), AsnName);
  const utf8 = (value: string) => new Utf8String({ value }).toBER();
  const notBefore = new Date();
  const info = new AttributeCertificateInfo({
    holder: new Holder({ baseCertificateID: new IssuerSerial({ issuer: new GeneralNames([new GeneralName({ directoryName: ekIssuer })]), serial: ab(Buffer.from(ek.serialNumber, 'hex')) }) }),
    issuer: new AttCertIssuer({ v2Form: new V2Form({ issuerName: new GeneralNames([new GeneralName({ directoryName: caName })]) }) }),
    signature: new AlgorithmIdentifier({ algorithm: ECDSA_SHA256_OID }),
    serialNumber: ab(Buffer.from(serial(), 'hex')),
    attrCertValidityPeriod: new AttCertValidityPeriod({ notBeforeTime: notBefore, notAfterTime: yearsFrom(notBefore, 20) }),
    attributes: [
      new Attribute({ type: PLATFORM.manufacturer, values: [utf8('vtpm')] }),
      new Attribute({ type: PLATFORM.model, values: [utf8(`vtpm host ${p.host}`)] }),
      new Attribute({ type: PLATFORM.version, values: [utf8('1')] }),
      new Attribute({ type: PLATFORM.serial, values: [utf8(p.hostId)] }),
    ],
  });
  const tbs = new Uint8Array(AsnConvert.serialize(info));
  const sig = await p.ca.signer(new Uint8Array(createHash('sha256').update(tbs).digest()));
  const cert = new AttributeCertificate({ acinfo: info, signatureAlgorithm: new AlgorithmIdentifier({ algorithm: ECDSA_SHA256_OID }), signatureValue: ab(ecdsaDer(sig)) });
  return new Uint8Array(AsnConvert.serialize(cert));
}

/** A platform certificate read back: the to-be-signed bytes, the signature (DER), what it names. */
export function parsePlatformCertificate(der: Uint8Array): { tbs: Uint8Array; signature: Uint8Array; holderSerial: string; attributes: Record<string, string> } {
  const cert = AsnConvert.parse(ab(der), AttributeCertificate);
  const attributes: Record<string, string> = {};
  for (const a of cert.acinfo.attributes) {
    const v = a.values[0];
    if (v) attributes[a.type] = utf8Value(v);
  }
  const holder = cert.acinfo.holder.baseCertificateID;
  return {
    tbs: new Uint8Array(AsnConvert.serialize(cert.acinfo)),
    signature: new Uint8Array(cert.signatureValue),
    holderSerial: holder ? Buffer.from(holder.serial).toString('hex') : '',
    attributes,
  };
}

export const PLATFORM_ATTRIBUTES = PLATFORM;

/** An attribute value (ANY) that should be a UTF8String. */
function utf8Value(v: ArrayBuffer): string {
  const r = fromBER(v);
  if (r.offset === -1 || !(r.result instanceof Utf8String)) throw new VtpmError('EINVAL', 'a platform certificate attribute is not a UTF8String');
  return r.result.valueBlock.value;
}
