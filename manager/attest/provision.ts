// Endorsement of a new vTPM, as a TPM maker provisions a chip: with the instance running
// (its tpm0 node opened like /dev/tpm0), create its EK(s) inside it, issue each an X.509
// EK certificate signed by the host CA through the hardware TPM, and write the
// certificates into the vTPM's NV at the standard indices, defined by the platform
// hierarchy and write-locked (TPM 2.0) or written before the NV lock (TPM 1.2), plus a
// platform certificate naming the host at 0x01C08000 (TPM 2.0).
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';
import { Tpm2Client, permanent } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_RH_ENDORSEMENT } from '../../drivers/tpm/tpm2.ts';
import { TPM_ALG } from '../../drivers/tpm/tpm2-structures.ts';
import { CERT_INDEX_ATTRIBUTES, writePlatformCertIndex } from '../../drivers/tpm/tpm2-attest.ts';
import * as t12 from '../../drivers/tpm/tpm12-attest.ts';
import { TpmResponseError } from '../../drivers/tpm/command.ts';
import type { TpmTransport } from '../../drivers/tpm/transport.ts';
import { EK_CERT_INDEX, PLATFORM_CERT_INDEX, ekTemplate, rsaSpki, spkiOf } from './ek.ts';
import type { HostCa } from './host-ca.ts';
import type { EkEntry } from './verify.ts';
import { issueEkCertificate, issuePlatformCertificate } from './x509.ts';

export interface Endorsement {
  ek: EkEntry[];
  platform?: Uint8Array;
}

const TPM_DISABLED_CMD = 0x7; // TPM 1.2: CreateEndorsementKeyPair when an EK exists

export async function provision(node: string, tpm: '1.2' | '2.0', uuid: string, ca: HostCa, hostId: string): Promise<Endorsement> {
  const dev = await TpmDevice.open(node);
  try {
    return tpm === '2.0' ? await provision2(dev, uuid, ca, hostId) : await provision12(dev, uuid, ca);
  } finally {
    await dev.close();
  }
}

async function provision2(dev: TpmTransport & TpmDevice, uuid: string, ca: HostCa, hostId: string): Promise<Endorsement> {
  const c = new Tpm2Client(dev);
  const issuer = { certificate: ca.certificate, signer: ca.signer };
  const ek: EkEntry[] = [];
  for (const kind of ['rsa', 'ecc'] as const) {
    const key = await c.createPrimary(permanent(TPM_RH_ENDORSEMENT), ekTemplate(kind));
    await c.flushContext(key.handle);
    const certificate = await issueEkCertificate({ ca: issuer, ekSpki: spkiOf(key.public.bytes), kind, tpm: '2.0', uuid, host: ca.host });
    await writePlatformCertIndex(dev, { index: EK_CERT_INDEX[kind], nameAlg: TPM_ALG.SHA256, attributes: CERT_INDEX_ATTRIBUTES, authPolicy: new Uint8Array(0) }, certificate);
    ek.push({ kind, index: EK_CERT_INDEX[kind], certificate });
  }
  const platform = await issuePlatformCertificate({ ca: issuer, ekCertificate: ek[0]!.certificate, host: ca.host, hostId });
  await writePlatformCertIndex(dev, { index: PLATFORM_CERT_INDEX, nameAlg: TPM_ALG.SHA256, attributes: CERT_INDEX_ATTRIBUTES, authPolicy: new Uint8Array(0) }, platform);
  return { ek, platform };
}

async function provision12(dev: TpmTransport, uuid: string, ca: HostCa): Promise<Endorsement> {
  const run = async (cmd: Uint8Array) => dev.transmit(cmd);
  // Physical presence, as a platform's firmware asserts it while provisioning.
  for (const f of [t12.TPM_PHYSICAL_PRESENCE_CMD_ENABLE, t12.TPM_PHYSICAL_PRESENCE_PRESENT]) {
    try {
      t12.parseOk(await run(t12.physicalPresence(f)));
    } catch (e) {
      // CMD_ENABLE is refused once the lifetime lock is set: presence may still be asserted.
      if (!(e instanceof TpmResponseError) || f !== t12.TPM_PHYSICAL_PRESENCE_CMD_ENABLE) throw e;
    }
  }
  let modulus: Uint8Array;
  try {
    modulus = t12.parsePubek(await run(t12.createEndorsementKeyPair()));
  } catch (e) {
    if (!(e instanceof TpmResponseError && e.rc === TPM_DISABLED_CMD)) throw e;
    modulus = t12.parsePubek(await run(t12.readPubek()));
  }
  const certificate = await issueEkCertificate({ ca: { certificate: ca.certificate, signer: ca.signer }, ekSpki: rsaSpki(modulus), kind: 'rsa', tpm: '1.2', uuid, host: ca.host });
  const stored = t12.storedCert(certificate);
  t12.parseOk(await run(t12.nvDefineSpace(t12.TPM_NV_INDEX_EKCERT, t12.TPM_NV_PER_PPWRITE, stored.length)));
  for (let off = 0; off < stored.length; off += t12.NV12_CHUNK) {
    t12.parseOk(await run(t12.nvWriteValue(t12.TPM_NV_INDEX_EKCERT, off, stored.subarray(off, off + t12.NV12_CHUNK))));
  }
  // From here NV authorisation is enforced: the certificate stays as written.
  t12.parseOk(await run(t12.nvDefineSpace(t12.TPM_NV_INDEX_LOCK, 0, 0)));
  return { ek: [{ kind: 'rsa', index: t12.TPM_NV_INDEX_EKCERT, certificate }] };
}
