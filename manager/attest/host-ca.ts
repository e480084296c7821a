// The host CA: a P-256 signing key created inside the hardware TPM (under the owner
// storage primary, fixedTPM: its private part never leaves the chip unwrapped), a
// self-signed X.509 certificate for it that the hardware TPM signed, and the evidence
// that the key is hardware-held: TPM2_Certify of the CA key by the hardware TPM's
// endorsement attestation key (below), qualified by the SHA-256 of the CA certificate, so
// the evidence names this certificate and no other.
//
// The endorsement attestation key (AK): a primary key of the endorsement hierarchy from a
// fixed template, restricted signing ECDSA P-256, fixedTPM. Being a primary of the
// endorsement seed it is the same key each time it is created on one chip (and on no other
// chip); being restricted it signs only what the TPM itself produced (TPMS_ATTEST), so a
// certification it signed is a statement of that TPM. A verifier trusts the chip's TCG EK
// (hw-ek.ts), not this key: the AK is bound to the EK by credential activation. Stored as
// attest-ca.sealed (sealed under the root key: the TPM-wrapped CA key blob, certificate,
// evidence).
import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { VtpmError } from '../../drivers/base/errors.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { permanent, type Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_RH_ENDORSEMENT } from '../../drivers/tpm/tpm2.ts';
import { Writer } from '../../drivers/tpm/marshal.ts';
import { TPMA_OBJECT, TPM_ALG, TPM_ECC_NIST_P256, ecdsaDer, eccPublicKey, eccSigningTemplate, parsePublic, type Signature } from '../../drivers/tpm/tpm2-structures.ts';
import { hardwareClient, ownerStoragePrimary, withFlush } from '../hardware/client.ts';
import { asBuffer, bytesField, checkRecord, textField } from '../store/sealed-file.ts';
import { readSealedRecord, writeSealedRecord } from '../store/sealed-record.ts';
import { issueCaCertificate, type DigestSigner } from './x509.ts';
import { caQualifier, verifyHostCa, type CaEvidence } from './verify.ts';

const FILE = 'attest-ca.sealed';
const MAX_FILE = 32 * 1024;

/** Restricted ECDSA-SHA256 P-256 signing primary for the endorsement hierarchy. */
export function endorsementAkTemplate(): Uint8Array {
  const a = TPMA_OBJECT;
  const w = new Writer(64).u16(TPM_ALG.ECC).u16(TPM_ALG.SHA256);
  w.u32(a.fixedTPM | a.fixedParent | a.sensitiveDataOrigin | a.userWithAuth | a.noDA | a.restricted | a.sign);
  w.sized16(new Uint8Array(0));
  w.u16(TPM_ALG.NULL).u16(TPM_ALG.ECDSA).u16(TPM_ALG.SHA256).u16(TPM_ECC_NIST_P256).u16(TPM_ALG.NULL);
  w.sized16(new Uint8Array(0)).sized16(new Uint8Array(0));
  return w.finish();
}

/** The hardware TPM's endorsement attestation key, loaded (the caller flushes it). */
export async function loadEndorsementAk(c: Tpm2Client, loaded: number[]) {
  const ak = await c.createPrimary(permanent(TPM_RH_ENDORSEMENT), endorsementAkTemplate());
  loaded.push(ak.handle);
  return ak;
}

export class HostCa {
  private constructor(
    private readonly hw: HardwareTpm,
    private readonly key: { public: Uint8Array; private: Uint8Array },
    readonly certificate: Uint8Array,
    readonly evidence: CaEvidence,
    readonly host: string,
  ) {}

  /** This host's CA: read back, or created in the hardware TPM on a first start. */
  static async open(hw: HardwareTpm, stateDir: string, rootKey: Uint8Array, log: (l: string) => void): Promise<HostCa> {
    const file = join(stateDir, FILE);
    const stored = readSealedRecord(file, rootKey, 'host CA', MAX_FILE);
    if (stored !== undefined) {
      const what = `the host CA record (${file})`;
      const f = checkRecord(stored, what, ['host', 'key', 'certificate', 'evidence']);
      const k = checkRecord(f.key, `${what} key`, ['public', 'private']);
      const e = checkRecord(f.evidence, `${what} evidence`, ['akPublic', 'caPublic', 'attest', 'signature']);
      const evidence = { akPublic: bytesField(e, 'akPublic', what), caPublic: bytesField(e, 'caPublic', what), attest: bytesField(e, 'attest', what), signature: bytesField(e, 'signature', what) };
      return new HostCa(hw, { public: bytesField(k, 'public', what), private: bytesField(k, 'private', what) }, bytesField(f, 'certificate', what), evidence, textField(f, 'host', what, 64));
    }
    const host = hostname().replace(/[^\x21-\x7e]/g, '').slice(0, 64) || 'host';
    const c = await hardwareClient(hw);
    const made = await withFlush(c, async (loaded) => {
      const primary = await ownerStoragePrimary(c, loaded);
      const blob = await c.create(primary, eccSigningTemplate());
      const key = await c.load(primary, blob);
      loaded.push(key.handle);
      const spki = new Uint8Array(eccPublicKey(parsePublic(blob.public)).export({ type: 'spki', format: 'der' }));
      const id = createHash('sha256').update(blob.public).digest('hex').slice(0, 16);
      const certificate = await issueCaCertificate({ subject: `CN=vtpm host CA ${host} ${id}, O=vtpm`, publicKeySpki: spki, signer: (d) => c.sign(key, d) });
      const ak = await loadEndorsementAk(c, loaded);
      const cert = await c.certify(key, ak, caQualifier(certificate));
      const evidence: CaEvidence = { akPublic: ak.public.bytes, caPublic: blob.public, attest: cert.attest, signature: ecdsaDer(cert.signature) };
      return { blob, certificate, evidence };
    });
    // What a verifier will check, checked here first (against the key this chip gives).
    verifyHostCa(made.certificate, made.evidence);
    writeSealedRecord(file, rootKey, 'host CA', {
      host,
      key: { public: asBuffer(made.blob.public), private: asBuffer(made.blob.private) },
      certificate: asBuffer(made.certificate),
      evidence: { akPublic: asBuffer(made.evidence.akPublic), caPublic: asBuffer(made.evidence.caPublic), attest: asBuffer(made.evidence.attest), signature: asBuffer(made.evidence.signature) },
    });
    log('host CA created in the hardware TPM and certified by its endorsement attestation key');
    return new HostCa(hw, made.blob, made.certificate, made.evidence, host);
  }

  /** The CA's signer: ECDSA-SHA256 over a digest by the hardware-held key (loaded per call). */
  readonly signer: DigestSigner = (digest) => this.signDigest(digest);

  private async signDigest(digest: Uint8Array): Promise<Signature> {
    if (digest.length !== 32) throw new VtpmError('EINVAL', `the host CA signs SHA-256 digests, not ${digest.length} bytes`);
    const c = await hardwareClient(this.hw);
    return withFlush(c, async (loaded) => {
      const primary = await ownerStoragePrimary(c, loaded);
      const key = await c.load(primary, this.key);
      loaded.push(key.handle);
      return c.sign(key, digest);
    });
  }
}
