// Acceptance for attestation, through the CLI and real clients inside guests: the EK
// certificates a TPM maker would have put in NV (tpm2_nvread, openssl), their keys equal
// to what tpm2_createek recreates, `openssl verify` against this host's CA and not another
// host's, the TPM 1.2 EK certificate, `vtpm verify` from the hardware TPM's TCG EK alone
// (offline links, then the credential challenge the host's TPM answers: passing, and
// failing with the link named for another chip, a tampered or replayed response),
// tpm2_makecredential's challenge answered by the host, our MakeCredential activated by
// tpm2_activatecredential in a guest, what `vtpm attest` says of an instance migrated in
// (no record there, and why), and the measured-launch log against the hardware PCR.
import t from 'tap';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { X509Certificate, createPublicKey, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import * as t12 from '../../drivers/tpm/tpm12-attest.ts';
import { makeCredential } from '../../drivers/tpm/tpm2-credential.ts';
import { encodeTpm2ToolsCredential } from '../../manager/attest/challenge.ts';
import { publicKeyOf, rsaSpki } from '../../manager/attest/ek.ts';
import { parseHwEk } from '../../manager/attest/verify.ts';
import { runTool, scratchDir } from '../clients/run.ts';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, transact, vtpm, type CliResult } from './host.ts';
import type { Tap } from '../clients/run.ts';

const work = scratchDir(t, 'vtpm-attest-guest');
const A = new TestHost(t);
// B takes migrations on loopback (a port of its own: other test files use their own namespaces).
const B = new TestHost(t, { listen: `127.0.0.1:${20000 + Math.floor(Math.random() * 20000)}` });
const file = (n: string) => join(work, n);

/** The verifier's anchor, read from the chip before its manager runs (enrolment). */
async function enrol(h: TestHost, out: string): Promise<void> {
  const r = await vtpm(['hw', 'info', '--hw', `tis:${h.hwDir}`, '--ek-out', out]);
  if (r.code !== 0) throw new Error(`vtpm hw info: ${r.stderr}`);
}

async function attest(h: TestHost, name: string, out: string, caPem: string): Promise<void> {
  const r = await vtpm(['attest', name, '--out', out, '--ca-pem', caPem, ...h.args]);
  if (r.code !== 0) throw new Error(`vtpm attest ${name}: ${r.stderr}`);
}

const verifyCli = (doc: string, hwEk: string, extra: string[] = []) => vtpm(['verify', doc, '--hw-ek', hwEk, ...extra]);
const activate = (h: TestHost, name: string, chal: string, out: string) => vtpm(['attest', name, '--activate', chal, '--out', out, ...h.args]);

/** The verifier's two steps around the host's answer; the final verify's result. */
async function verifyBound(t: Tap, h: TestHost, name: string, doc: string, hwEk: string, extra: string[] = []): Promise<CliResult> {
  const chal = file(`${name}-${++seq}.chal`);
  const c = await verifyCli(doc, hwEk, ['--challenge-out', chal, ...extra]);
  t.equal(c.code, 0, `vtpm verify --challenge-out${c.code ? `: ${c.stderr}` : ''}`);
  const a = await activate(h, name, chal, `${chal}.resp`);
  t.equal(a.code, 0, `vtpm attest ${name} --activate${a.code ? `: ${a.stderr}` : ''}`);
  return verifyCli(doc, hwEk, ['--response', `${chal}.resp`, ...extra]);
}
let seq = 0;

t.test('TPM 2.0 guest: EK certificates in NV, chained to the hardware TPM', async (t) => {
  await enrol(A, file('hw-ek-a.pem'));
  await enrol(B, file('hw-ek-b.pem'));
  const node = await A.start(t, 'g20', '2.0');
  await B.start(t, 'b20', '2.0');
  await attest(A, 'g20', file('g20.attest'), file('ca-a.pem'));
  await attest(B, 'b20', file('b20.attest'), file('ca-b.pem'));
  const tools = tpm2Tools(t, `device:${node}`, { timeoutMs: 60_000 });
  for (const [kind, index] of [['rsa', '0x1c00002'], ['ecc', '0x1c0000a']] as const) {
    const der = tools.file(`ek-${kind}.der`);
    await tools.run('nvread', [index, '-o', der]);
    const parsed = await runTool('openssl', ['x509', '-inform', 'DER', '-in', der, '-noout', '-subject', '-issuer']);
    t.equal(parsed.code, 0, `tpm2_nvread ${index}: openssl x509 parses the DER certificate`);
    t.match(parsed.stdout, /issuer=.*vtpm host CA/, `${kind}: issued by the host CA`);
    const ekPem = tools.file(`ek-${kind}.pem`);
    await tools.run('createek', ['-c', tools.file('ek.ctx'), '-G', kind, '-u', ekPem, '-f', 'pem']);
    await tools.flush();
    const cert = new X509Certificate(readFileSync(der));
    t.ok(cert.publicKey.equals(createPublicKey(readFileSync(ekPem))), `${kind}: the certificate's key is tpm2_createek's EK`);
    const certPem = tools.writeFile(`ek-${kind}-cert.pem`, cert.toString());
    t.equal((await runTool('openssl', ['verify', '-CAfile', file('ca-a.pem'), certPem])).code, 0, `${kind}: openssl verify with this host's CA passes`);
    t.not((await runTool('openssl', ['verify', '-CAfile', file('ca-b.pem'), certPem])).code, 0, `${kind}: openssl verify with another host's CA fails`);
    const v = await verifyCli(file('g20.attest'), file('hw-ek-a.pem'), ['--guest-ek', ekPem]);
    t.equal(v.code, 2, `vtpm verify offline with the guest's ${kind} EK: the offline links hold (exit 2: not yet bound)${v.code !== 2 ? `: ${v.stderr}` : ''}`);
    t.match(v.stdout, /guest EK → vTPM EK certificate\s+good/, "the guest's EK is one of the certified");
    if (kind === 'rsa') {
      const tss = tools.file('ek-rsa.pub');
      await tools.run('createek', ['-c', tools.file('ek.ctx'), '-G', 'rsa', '-u', tss]);
      await tools.flush();
      t.same(Buffer.from(parseHwEk(readFileSync(ekPem)).public), readFileSync(tss).subarray(2), "the TPMT_PUBLIC a verifier rebuilds from an EK's PEM (template L-1) is tpm2_createek's public area");
      // The enrolment code on a TPM tpm2-tools can reach too: this guest's node as the "hardware".
      const enrolled = file('g20-as-hw-ek.pem');
      const hi = await vtpm(['hw', 'info', '--hw', `device:${node}`, '--ek-out', enrolled]);
      t.equal(hi.code, 0, `vtpm hw info --hw device:NODE --ek-out${hi.code ? `: ${hi.stderr}` : ''}`);
      t.equal(readFileSync(enrolled, 'utf8'), readFileSync(ekPem, 'utf8'), 'writes the PEM tpm2_createek -G rsa -f pem writes for the same TPM');
    }
  }
  const plat = tools.file('platform.der');
  await tools.run('nvread', ['0x1c08000', '-o', plat]);
  t.ok(readFileSync(plat).length > 100, 'a platform certificate at 0x01C08000');

  const ekPemA = readFileSync(file('hw-ek-a.pem'), 'utf8');
  t.match(ekPemA, /^-----BEGIN PUBLIC KEY-----\n[^-]+-----END PUBLIC KEY-----\n$/, 'vtpm hw info --ek-out writes one PEM SubjectPublicKeyInfo');
  t.equal(createPublicKey(ekPemA).asymmetricKeyDetails?.modulusLength, 2048, 'of an RSA 2048 key');
  const asked = await vtpm(['attest', 'g20', '--out', file('g20-again.attest'), '--hw-ek-out', file('hw-ek-a-running.pem'), ...A.args]);
  t.equal(asked.code, 0, `vtpm attest --hw-ek-out${asked.code ? `: ${asked.stderr}` : ''}`);
  t.equal(readFileSync(file('hw-ek-a-running.pem'), 'utf8'), ekPemA, 'the running manager gives the same EK as the enrolment');
  const offline = await verifyCli(file('g20.attest'), file('hw-ek-a.pem'));
  t.equal(offline.code, 2, `offline, vtpm verify exits 2${offline.code !== 2 ? `: ${offline.stderr}` : ''}`);
  t.match(offline.stdout, /attestation key → hardware EK\s+not checked/, 'and says the attestation key is not yet bound to the EK');
  t.match(offline.stdout, /NOT VERIFIED/, 'in plain words');
  const doc = decode(readFileSync(file('g20.attest'))) as { ek: { certificate: Uint8Array }[]; evidence: unknown };
  const other = decode(readFileSync(file('b20.attest'))) as { evidence: unknown };
  writeFileSync(file('swapped.attest'), encode({ ...doc, evidence: other.evidence }));
  const swapped = await verifyCli(file('swapped.attest'), file('hw-ek-a.pem'));
  t.not(swapped.code, 0, 'CA evidence from another hardware TPM fails');
  t.match(swapped.stderr, /broken link: hardware evidence.*another host CA certificate/, 'naming the link');
  const cert = Buffer.from(doc.ek[0]!.certificate);
  cert[cert.length - 12]! ^= 0x40;
  writeFileSync(file('altered.attest'), encode({ ...doc, ek: [{ ...doc.ek[0], certificate: cert }, ...doc.ek.slice(1)] }));
  const altered = await verifyCli(file('altered.attest'), file('hw-ek-a.pem'));
  t.not(altered.code, 0, 'an altered certificate byte fails');
  t.match(altered.stderr, /broken link: vTPM EK certificate \(RSA\) → host CA/, 'naming the EK certificate link');
});

t.test('the whole chain, bound to the hardware EK by a credential challenge', async (t) => {
  const doc = file('g20.attest');
  const ekA = file('hw-ek-a.pem');
  const state = `${doc}.verifier`;
  const chal = file('g20.chal');
  const c = await verifyCli(doc, ekA, ['--challenge-out', chal]);
  t.equal(c.code, 0, `step 1: vtpm verify --challenge-out${c.code ? `: ${c.stderr}` : ''}`);
  t.match(c.stdout, /attestation key → hardware EK\s+pending/, 'the binding is pending');
  t.equal(statSync(state).mode & 0o777, 0o600, 'the verifier state is 0600');
  const a = await activate(A, 'g20', chal, file('g20.resp'));
  t.equal(a.code, 0, `the host answers: vtpm attest g20 --activate${a.code ? `: ${a.stderr}` : ''}`);
  t.equal(statSync(file('g20.resp')).mode & 0o777, 0o600, 'the response is 0600');
  const done = await verifyCli(doc, ekA, ['--response', file('g20.resp'), '--json']);
  t.equal(done.code, 0, `step 2: vtpm verify --response${done.code ? `: ${done.stderr}` : ''}`);
  const res = JSON.parse(done.stdout) as { verified: boolean; links: { link: string; status: string }[]; akName: string };
  t.ok(res.verified && res.links.every((l) => l.status === 'good'), 'every link good');
  t.ok(res.links.some((l) => l.link === 'attestation key → hardware EK'), 'the binding link among them');
  t.notOk(existsSync(state), 'the answered challenge is consumed');
  const text = await verifyBound(t, A, 'g20', doc, ekA);
  t.equal(text.code, 0, 'the same through the table output');
  t.match(text.stdout, /attestation key → hardware EK\s+good/, 'the table says the binding is good');
  t.match(text.stdout, /^verified: instance g20/m, 'and the chain verified');

  // A response replayed against a new challenge.
  t.equal((await verifyCli(doc, ekA, ['--challenge-out', file('g20-2.chal')])).code, 0, 'a new challenge');
  const replayed = await verifyCli(doc, ekA, ['--response', file('g20.resp')]);
  t.not(replayed.code, 0, 'the old response replayed against it fails');
  t.match(replayed.stderr, /broken link: attestation key → hardware EK: the response answers another challenge/, 'naming the binding link');
  // A tampered response.
  t.equal((await activate(A, 'g20', file('g20-2.chal'), file('g20-2.resp'))).code, 0, 'the host answers the new challenge');
  const resp = decode(readFileSync(file('g20-2.resp'))) as { secret: Uint8Array };
  const secret = Buffer.from(resp.secret);
  secret[5]! ^= 0x01;
  writeFileSync(file('g20-2-bad.resp'), encode({ ...resp, secret }));
  const tampered = await verifyCli(doc, ekA, ['--response', file('g20-2-bad.resp')]);
  t.not(tampered.code, 0, 'a tampered response fails');
  t.match(tampered.stderr, /broken link: attestation key → hardware EK: the secret in the response is not the challenge's/, 'naming the binding link');
  t.equal((await verifyCli(doc, ekA, ['--response', file('g20-2.resp')])).code, 0, 'the genuine answer still passes after those failures');
  const again = await verifyCli(doc, ekA, ['--response', file('g20-2.resp')]);
  t.not(again.code, 0, 'and only once');
  t.match(again.stderr, /no challenge pending .*used up/, 'the challenge was used up');

  // Another hardware TPM: B's chain (self-consistent offline) presented for A's EK.
  const bDoc = file('b20.attest');
  const chB = await verifyCli(bDoc, ekA, ['--challenge-out', file('b20.chal')]);
  t.equal(chB.code, 0, "B's chain passes the offline links: a challenge goes out for A's EK");
  const actB = await activate(B, 'b20', file('b20.chal'), file('b20.resp'));
  t.not(actB.code, 0, "host B's TPM cannot answer a challenge made for A's EK");
  t.match(actB.stderr, /refused the challenge.*TPM_RC_/, 'the TPM refuses it');
  const own = await verifyCli(bDoc, file('hw-ek-b.pem'), ['--challenge-out', file('b20-own.chal'), '--state', file('b20-own.state')]);
  t.equal(own.code, 0, 'a challenge for B with its own EK');
  t.equal((await activate(B, 'b20', file('b20-own.chal'), file('b20-own.resp'))).code, 0, 'which B answers');
  const cross = await verifyCli(bDoc, ekA, ['--response', file('b20-own.resp')]);
  t.not(cross.code, 0, "B's answer for its own EK does not answer the challenge for A's");
  t.match(cross.stderr, /broken link: attestation key → hardware EK/, 'naming the binding link');
  const id = (decode(readFileSync(file('b20.chal'))) as { id: Uint8Array }).id;
  writeFileSync(file('b20-forged.resp'), encode({ v: 1, kind: 'vtpm-credential-response', id, secret: randomBytes(32) }));
  const forged = await verifyCli(bDoc, ekA, ['--response', file('b20-forged.resp')]);
  t.not(forged.code, 0, 'a guessed secret for that challenge fails');
  t.match(forged.stderr, /broken link: attestation key → hardware EK: the secret/, 'naming the binding link');
  const ownDone = await verifyCli(bDoc, file('hw-ek-b.pem'), ['--response', file('b20-own.resp'), '--state', file('b20-own.state')]);
  t.equal(ownDone.code, 0, "B's chain verifies against B's EK");

  // tpm2-tools' MakeCredential (independent implementation) for A's EK PEM and A's AK.
  const want = randomBytes(32);
  writeFileSync(file('tools.secret'), want);
  const mk = await runTool('tpm2_makecredential', ['-T', 'none', '-G', 'rsa', '-u', ekA, '-s', file('tools.secret'), '-n', res.akName, '-o', file('tools.cred')]);
  t.equal(mk.code, 0, `tpm2_makecredential -T none for the enrolled EK${mk.code ? `: ${mk.stderr}` : ''}`);
  const got = await activate(A, 'g20', file('tools.cred'), file('tools.out'));
  t.equal(got.code, 0, `vtpm attest --activate takes tpm2_makecredential's file${got.code ? `: ${got.stderr}` : ''}`);
  t.same(readFileSync(file('tools.out')), want, 'and the hardware TPM returns its secret');
  t.not((await activate(B, 'b20', file('tools.cred'), file('tools-b.out'))).code, 0, 'host B cannot');
});

t.test('our MakeCredential, activated by tpm2_activatecredential in a guest', async (t) => {
  const node = join(A.dir, 'g20', 'dev', 'tpm0');
  const tools = tpm2Tools(t, `device:${node}`, { timeoutMs: 60_000 });
  const ekCtx = tools.file('ek.ctx');
  const ekPub = tools.file('ek.pub');
  const akCtx = tools.file('ak.ctx');
  const akName = tools.file('ak.name');
  await tools.run('createek', ['-c', ekCtx, '-G', 'rsa', '-u', ekPub]);
  await tools.run('createak', ['-C', ekCtx, '-c', akCtx, '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-n', akName]);
  await tools.run('flushcontext', ['-t']);
  const area = readFileSync(ekPub).subarray(2);
  const want = randomBytes(32);
  const cred = tools.writeFile('ours.cred', Buffer.from(encodeTpm2ToolsCredential(makeCredential(area, publicKeyOf(area), readFileSync(akName), want))));
  const session = tools.file('session.ctx');
  await tools.run('startauthsession', ['--policy-session', '-S', session]);
  await tools.run('policysecret', ['-S', session, '-c', 'e']);
  const out = tools.file('activated');
  await tools.run('activatecredential', ['-c', akCtx, '-C', ekCtx, '-i', cred, '-o', out, '-P', `session:${session}`]);
  await tools.run('flushcontext', [session]);
  await tools.flush();
  t.same(readFileSync(out), want, "tpm2_activatecredential in the guest's TPM returns our credential's secret");

});

t.test('TPM 1.2 guest: EK certificate at TPM_NV_INDEX_EKCert, verifiable', async (t) => {
  const node = await A.start(t, 'g12', '1.2');
  const head = t12.parseNvReadValue(transact(node, t12.nvReadValue(t12.TPM_NV_INDEX_EKCERT, 0, 7)));
  const total = 5 + Buffer.from(head).readUInt16BE(3);
  const parts: Buffer[] = [];
  for (let off = 0; off < total; off += 512) parts.push(Buffer.from(t12.parseNvReadValue(transact(node, t12.nvReadValue(t12.TPM_NV_INDEX_EKCERT, off, Math.min(512, total - off))))));
  const der = t12.unstoreCert(Buffer.concat(parts));
  const cert = new X509Certificate(der);
  const modulus = t12.parsePubek(transact(node, t12.readPubek()));
  t.ok(cert.publicKey.equals(createPublicKey({ key: Buffer.from(rsaSpki(modulus)), format: 'der', type: 'spki' })), "the certificate's key is the EK TPM_ReadPubek returns");
  const pem = file('ek12.pem');
  writeFileSync(pem, cert.toString());
  t.equal((await runTool('openssl', ['verify', '-CAfile', file('ca-a.pem'), pem])).code, 0, 'openssl verify with the host CA passes');
  await attest(A, 'g12', file('g12.attest'), file('ca-a2.pem'));
  const v = await verifyBound(t, A, 'g12', file('g12.attest'), file('hw-ek-a.pem'));
  t.equal(v.code, 0, `vtpm verify passes for the TPM 1.2 chain, bound to the hardware EK${v.code ? `: ${v.stderr}` : ''}`);
});

t.test('a migrated instance: the destination has no attestation record for it, and says why', async (t) => {
  await A.start(t, 'm20', '2.0');
  for (const [from, to, name] of [[A, B, 'a'], [B, A, 'b']] as const) {
    const id = file(`${name}.id`);
    const r = await vtpm(['host', 'identity', '--out', id, ...from.args]);
    t.equal(r.code, 0, `vtpm host identity of ${name}${r.code ? `: ${r.stderr}` : ''}`);
    const a = await vtpm(['host', 'trust', 'add', name, id, ...to.args]);
    t.equal(a.code, 0, `trust add ${name}${a.code ? `: ${a.stderr}` : ''}`);
  }
  const m = await vtpm(['migrate', 'm20', '--to', B.listen!, ...A.args], 180_000);
  t.equal(m.code, 0, `vtpm migrate m20 to host B${m.code ? `: ${m.stderr}` : ''}`);
  const there = await vtpm(['attest', 'm20', '--out', file('m20.attest'), ...B.args]);
  t.not(there.code, 0, 'vtpm attest on the destination fails');
  t.match(there.stderr, /m20 has no attestation record on this host: this host's CA did not endorse it\. It was created \(.*\) after this host's CA \(.*\), so on another host, and migrated here/, `and says why: ${there.stderr.trim()}`);
  t.notOk(existsSync(file('m20.attest')), 'no document written');
  const node = (await B.list()).find((i) => i.name === 'm20')?.node;
  t.ok(node, 'm20 runs on host B');
  const tools = tpm2Tools(t, `device:${node}`, { timeoutMs: 60_000 });
  const der = tools.file('m20-ek.der');
  await tools.run('nvread', ['0x1c00002', '-o', der]);
  const pem = tools.writeFile('m20-ek.pem', new X509Certificate(readFileSync(der)).toString());
  t.equal((await runTool('openssl', ['verify', '-CAfile', file('ca-a.pem'), pem])).code, 0, "its EK certificate in NV still chains to host A's CA, as the message says");
});

t.test('measured launch: the event log replays to the hardware PCR', async (t) => {
  const r = await vtpm(['eventlog', '--json', ...A.args]);
  t.equal(r.code, 0, `vtpm eventlog${r.code ? `: ${r.stderr}` : ''}`);
  const log = JSON.parse(r.stdout) as { pcr: number; value: string; replayed: string; matches: boolean; events: { name: string }[] };
  t.equal(log.pcr, 23, 'PCR 23 by default');
  t.ok(log.matches && log.replayed === log.value, 'replaying the log gives the hardware PCR value');
  const names = log.events.map((e) => e.name);
  t.ok(names.filter((n) => n === 'g20').length >= 2 && names.includes('g12'), `every launch is logged (provisioning and start): ${names.join(',')}`);
  const text = await vtpm(['eventlog', ...A.args]);
  t.match(text.stdout, /\(matches\)/, 'the plain output says the replay matches');
});
