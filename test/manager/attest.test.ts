// Attestation pieces on two emulated hardware TPMs (hosts A and B, each its own chip and
// endorsement seed): the host CA made in the chip and certified by its endorsement
// attestation key, certificates the chip signs through @peculiar/x509, the verifier's
// offline checks link by link (another chip's evidence, an altered byte), openssl's view of
// the same certificates, the attestation key bound to the chip's TCG EK by credential
// activation (our MakeCredential and the TPM's own, activated in the chip; another chip
// cannot), and the measured-launch log replayed against the chip's PCR.
import t from 'tap';
import { cpSync, mkdirSync, writeFileSync, appendFileSync } from 'node:fs';
import { X509Certificate, createPublicKey, generateKeyPairSync } from 'node:crypto';
import * as path from 'node:path';
import { isVtpmError } from '../../drivers/base/errors.ts';
import { BUILD_DIR } from '../../drivers/base/modules.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { createPublicKey as pub } from 'node:crypto';
import { permanent } from '../../drivers/tpm/tpm2-client.ts';
import { makeCredential, tpmMakeCredential } from '../../drivers/tpm/tpm2-credential.ts';
import { TPM_RH_ENDORSEMENT } from '../../drivers/tpm/tpm2.ts';
import { hardwareClient } from '../../manager/hardware/client.ts';
import { checkResponse, decodeChallenge, encodeResponse, makeChallenge } from '../../manager/attest/challenge.ts';
import { ekTemplate } from '../../manager/attest/ek.ts';
import { HostCa } from '../../manager/attest/host-ca.ts';
import { activateInHardware, hardwareEk, hardwareNames } from '../../manager/attest/hw-ek.ts';
import { MeasuredLaunch, codeDigest, eventDigest, replay } from '../../manager/attest/measure.ts';
import { decodeAttestation, encodeAttestation, parseHwEk, verifyAttestation, type AttestationDoc } from '../../manager/attest/verify.ts';
import { issueEkCertificate, issuePlatformCertificate } from '../../manager/attest/x509.ts';
import { runTool, type Tap } from '../clients/run.ts';
import { loadedHandles, openChip, tempDir } from './hw-chip.ts';

const dir = tempDir(t, 'vtpm-attest-');
const rootKey = new Uint8Array(32).fill(7);
const chips: HardwareTpm[] = [];
t.teardown(async () => {
  for (const c of chips) await c.close();
});
type Host = { hw: HardwareTpm; state: string; ca: HostCa; hwEk: ReturnType<typeof parseHwEk> };
const hosts = new Map<string, Promise<Host>>();
/** Host `name`'s chip, opened once for the whole file (one worker per NVRAM). */
function host(name: string): Promise<Host> {
  if (!hosts.has(name)) hosts.set(name, openHost(name));
  return hosts.get(name)!;
}
async function openHost(name: string): Promise<Host> {
  const state = path.join(dir, name, 'state');
  mkdirSync(state, { recursive: true });
  const hw = await openChip(path.join(dir, name, 'hw'));
  chips.push(hw);
  const ca = await HostCa.open(hw, state, rootKey, () => undefined);
  const k = await hardwareEk(hw);
  return { hw, state, ca, hwEk: parseHwEk(Buffer.from(k.pem)) };
}

const uuid = '0b7d4a9e-7d7a-4d4c-9a51-1f6a3c1e2b11';
const spkiOf = (k: ReturnType<typeof generateKeyPairSync>['publicKey']) => new Uint8Array(k.export({ type: 'spki', format: 'der' }));
const rsaEk = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey;
const eccEk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey;

async function documentOf(ca: HostCa): Promise<AttestationDoc> {
  const issuer = { certificate: ca.certificate, signer: ca.signer };
  const rsa = await issueEkCertificate({ ca: issuer, ekSpki: spkiOf(rsaEk), kind: 'rsa', tpm: '2.0', uuid, host: ca.host });
  const ecc = await issueEkCertificate({ ca: issuer, ekSpki: spkiOf(eccEk), kind: 'ecc', tpm: '2.0', uuid, host: ca.host });
  const platform = await issuePlatformCertificate({ ca: issuer, ekCertificate: rsa, host: ca.host, hostId: 'test' });
  return {
    instance: { name: 'g1', uuid, tpm: '2.0' },
    ek: [
      { kind: 'rsa', index: 0x01c00002, certificate: rsa },
      { kind: 'ecc', index: 0x01c0000a, certificate: ecc },
    ],
    platform,
    ca: ca.certificate,
    evidence: ca.evidence,
  };
}

const refused = (t: Tap, fn: () => unknown, link: RegExp, what: string) => {
  try {
    fn();
    t.fail(`${what}: accepted`);
  } catch (e) {
    t.ok(isVtpmError(e, 'EINTEGRITY'), `${what}: EINTEGRITY`);
    t.match((e as Error).message, link, `${what}: names the link (${(e as Error).message})`);
  }
};

t.test('host CA in the hardware TPM: the offline links of the chain, and the EK a verifier rebuilds', async (t) => {
  const A = await host('a');
  const B = await host('b');
  t.same(await loadedHandles(A.hw), [], 'nothing left loaded in chip A');
  const again = await HostCa.open(A.hw, A.state, rootKey, () => undefined);
  t.same(Buffer.from(again.certificate), Buffer.from(A.ca.certificate), 'the host CA is read back, not made anew');
  const ekA = await hardwareEk(A.hw);
  t.equal((await hardwareEk(A.hw)).pem, ekA.pem, 'the EK is the same each time on one chip');
  t.not(ekA.pem, (await hardwareEk(B.hw)).pem, 'another chip has another EK');
  t.same(Buffer.from(A.hwEk.public), Buffer.from(ekA.public), "the verifier's TPMT_PUBLIC, rebuilt from the PEM and template L-1, is the chip's EK public area");
  t.same(Buffer.from(A.hwEk.name), Buffer.from(ekA.name), '… so the name it derives is the name the chip gives');
  t.equal(A.hwEk.key.asymmetricKeyDetails?.modulusLength, 2048, 'an RSA 2048 EK');

  const doc = await documentOf(A.ca);
  const bytes = encodeAttestation(doc);
  const res = verifyAttestation(decodeAttestation(bytes), eccEk);
  t.equal(res.ek.length, 2, 'both EK certificates verified');
  t.ok(res.platform, 'platform certificate verified');
  t.equal(res.akName, Buffer.from((await hardwareNames(A.hw)).ak).toString('hex'), "the attestation key named is chip A's");
  const other = await documentOf(B.ca);
  refused(t, () => verifyAttestation({ ...doc, evidence: other.evidence }), /broken link: hardware evidence.*another host CA certificate/, 'CA evidence from another hardware TPM');
  refused(t, () => verifyAttestation({ ...other, evidence: doc.evidence }), /broken link: hardware evidence.*another host CA certificate/, "B's CA with A's evidence");
  const flip = (b: Uint8Array, at: number) => {
    const c = new Uint8Array(b);
    c[at]! ^= 0x01;
    return c;
  };
  const ekAt = doc.ek[0]!.certificate.length - 20; // inside the signature
  refused(t, () => verifyAttestation({ ...doc, ek: [{ ...doc.ek[0]!, certificate: flip(doc.ek[0]!.certificate, ekAt) }] }), /broken link: vTPM EK certificate \(RSA\) → host CA/, 'an altered EK certificate byte');
  refused(t, () => verifyAttestation({ ...doc, ca: flip(doc.ca, 200) }), /broken link: hardware evidence.*another host CA certificate/, 'an altered CA certificate byte');
  refused(t, () => verifyAttestation({ ...doc, platform: flip(doc.platform!, doc.platform!.length - 10) }), /broken link: platform certificate/, 'an altered platform certificate byte');
  const attest = flip(doc.evidence.attest, doc.evidence.attest.length - 3);
  refused(t, () => verifyAttestation({ ...doc, evidence: { ...doc.evidence, attest } }), /broken link: hardware evidence.*signature/, 'an altered certification');
  refused(t, () => verifyAttestation(doc, generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey), /broken link: guest EK/, 'a guest EK the chain does not certify');

  // openssl, as a verifier holding only the CA certificate would use it.
  const w = (n: string, der: Uint8Array) => {
    const p = path.join(dir, n);
    writeFileSync(p, new X509Certificate(der).toString());
    return p;
  };
  const caA = w('ca-a.pem', A.ca.certificate);
  const caB = w('ca-b.pem', B.ca.certificate);
  for (const e of doc.ek) {
    const ek = w(`ek-${e.kind}.pem`, e.certificate);
    t.equal((await runTool('openssl', ['verify', '-CAfile', caA, ek])).code, 0, `openssl verify: ${e.kind} EK certificate chains to host A's CA`);
    t.not((await runTool('openssl', ['verify', '-CAfile', caB, ek])).code, 0, `openssl verify: not to host B's CA`);
  }
  t.ok(new X509Certificate(doc.ek[1]!.certificate).publicKey.equals(createPublicKey(eccEk.export({ type: 'spki', format: 'pem' }))), 'the ECC EK certificate carries the EK');
  t.same(await loadedHandles(A.hw), [], 'nothing left loaded after signing');
});

t.test('the attestation key bound to the TCG EK: credential activation in the chip', async (t) => {
  const A = await host('a');
  const B = await host('b');
  const doc = await documentOf(A.ca);
  const bytes = encodeAttestation(doc);
  const akName = Buffer.from(verifyAttestation(decodeAttestation(bytes)).akName, 'hex');
  const made = makeChallenge(bytes, uuid, akName, A.hwEk);
  const ch = decodeChallenge(made.challenge);
  t.equal(ch.format, 'vtpm', 'our challenge format');
  const secret = await activateInHardware(A.hw, ch.credential);
  t.equal(secret.length, 32, 'chip A activates the challenge made in software for its EK and AK');
  t.doesNotThrow(() => checkResponse(made.state, bytes, A.hwEk, encodeResponse(ch.id!, secret)), 'and the verifier accepts the secret');
  t.notOk(Buffer.from(made.state).includes(Buffer.from(secret)), 'the verifier state does not hold the secret');
  await t.rejects(activateInHardware(B.hw, ch.credential), /refused the challenge.*TPM_RC_/, "chip B cannot activate a challenge for chip A's EK");
  const forB = makeChallenge(bytes, uuid, akName, B.hwEk);
  await t.rejects(activateInHardware(B.hw, decodeChallenge(forB.challenge).credential), /refused the challenge/, "nor one for its own EK naming chip A's attestation key");
  const altered = { ...ch.credential, credentialBlob: new Uint8Array(ch.credential.credentialBlob) };
  altered.credentialBlob[10]! ^= 1;
  await t.rejects(activateInHardware(A.hw, altered), /refused the challenge.*TPM_RC_INTEGRITY/, 'an altered credential blob is refused by the TPM (its HMAC)');
  refused(t, () => checkResponse(made.state, bytes, A.hwEk, encodeResponse(ch.id!, new Uint8Array(32))), /broken link: attestation key → hardware EK: the secret/, 'a wrong secret');

  // The TPM's own TPM2_MakeCredential for the same EK, name and secret: our activation path opens it.
  const c = await hardwareClient(A.hw);
  const ek = await c.createPrimary(permanent(TPM_RH_ENDORSEMENT), ekTemplate('rsa'));
  const want = new Uint8Array(Buffer.from('a credential made by the TPM....'));
  const tpmMade = await tpmMakeCredential(c, ek.handle, want, akName);
  await c.flushContext(ek.handle);
  t.same(Buffer.from(await activateInHardware(A.hw, tpmMade)), Buffer.from(want), "TPM2_MakeCredential's blob activates to its secret");
  const ours = makeCredential(A.hwEk.public, pub(A.hwEk.key.export({ type: 'spki', format: 'pem' })), akName, want);
  t.same(Buffer.from(await activateInHardware(A.hw, ours)), Buffer.from(want), "and so does our MakeCredential's for the same inputs");
  t.same(await loadedHandles(A.hw), [], 'nothing left loaded in chip A');
  t.same(await loadedHandles(B.hw), [], 'nor in chip B after its refusals');
});

t.test('measured launch: the log replays to the hardware PCR', async (t) => {
  const hw = await openChip(path.join(dir, 'a', 'hw'));
  chips.push(hw);
  const run = path.join(dir, 'run');
  mkdirSync(run, { recursive: true });
  const m = await MeasuredLaunch.open(hw, run, 23, () => undefined);
  await m.measure({ name: 'g1', uuid, tpm: '2.0', guest: 'raw' });
  await m.measure({ name: 'g2', uuid, tpm: '1.2', guest: 'qemu' });
  const log = await m.read();
  t.equal(log.events.length, 2, 'two launches logged');
  t.equal(replay(log), log.value, 'replaying the log gives PCR 23');
  const forged = { ...log, events: [log.events[0]!, { ...log.events[1]!, name: 'other' }] };
  t.throws(() => replay(forged), /event 1 \(other\): its config digest/, 'a changed event field is caught');
  const reopened = await MeasuredLaunch.open(hw, run, 23, () => undefined);
  t.equal((await reopened.read()).events.length, 2, 'a new manager continues the log that still replays');

  // The code digest covers vtpmd's files: one changed file changes the digest, the event, the PCR.
  const copy = path.join(dir, 'code', 'vtpmd');
  cpSync(path.join(BUILD_DIR, 'vtpmd'), copy, { recursive: true });
  const before = codeDigest([copy]);
  t.equal(codeDigest([copy]), before, 'the same files give the same digest');
  appendFileSync(path.join(copy, 'main.js'), '\n// changed\n');
  const after = codeDigest([copy]);
  t.not(after, before, 'a changed vtpmd file changes the code digest');
  const ev = log.events[0]!;
  t.not(eventDigest(after, ev.config), eventDigest(before, ev.config), 'and the event extended into the PCR');
});
