// Acceptance for attestation, through the CLI and real clients inside guests: the EK
// certificates a TPM maker would have put in NV (tpm2_nvread, openssl), their keys equal
// to what tpm2_createek recreates, `openssl verify` against this host's CA and not another
// host's, the TPM 1.2 EK certificate, `vtpm verify` from the hardware key alone (passing,
// and failing with the link named), and the measured-launch log against the hardware PCR.
import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { X509Certificate, createPublicKey } from 'node:crypto';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import * as t12 from '../../drivers/tpm/tpm12-attest.ts';
import { rsaSpki } from '../../manager/attest/ek.ts';
import { runTool, scratchDir } from '../clients/run.ts';
import { tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, transact, vtpm } from './host.ts';

const work = scratchDir(t, 'vtpm-attest-guest');
const A = new TestHost(t);
const B = new TestHost(t);
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
    t.equal(v.code, 0, `vtpm verify with the guest's ${kind} EK passes${v.code ? `: ${v.stderr}` : ''}`);
  }
  const plat = tools.file('platform.der');
  await tools.run('nvread', ['0x1c08000', '-o', plat]);
  t.ok(readFileSync(plat).length > 100, 'a platform certificate at 0x01C08000');

  const ok = await verifyCli(file('g20.attest'), file('hw-ek-a.pem'));
  t.equal(ok.code, 0, `vtpm verify passes on a good chain${ok.code ? `: ${ok.stderr}` : ''}`);
  t.match(ok.stdout, /its key is held by the hardware TPM/, 'and says what it checked');
  const wrongChip = await verifyCli(file('g20.attest'), file('hw-ek-b.pem'));
  t.not(wrongChip.code, 0, "vtpm verify with another machine's hardware key fails");
  t.match(wrongChip.stderr, /broken link: hardware evidence/, 'naming the hardware evidence link');

  const doc = decode(readFileSync(file('g20.attest'))) as { ek: { certificate: Uint8Array }[]; evidence: unknown };
  const other = decode(readFileSync(file('b20.attest'))) as { evidence: unknown };
  writeFileSync(file('swapped.attest'), encode({ ...doc, evidence: other.evidence }));
  const swapped = await verifyCli(file('swapped.attest'), file('hw-ek-a.pem'));
  t.not(swapped.code, 0, 'CA evidence from another hardware TPM fails');
  t.match(swapped.stderr, /broken link: hardware evidence .*another hardware TPM/, 'naming the link');
  const cert = Buffer.from(doc.ek[0]!.certificate);
  cert[cert.length - 12]! ^= 0x40;
  writeFileSync(file('altered.attest'), encode({ ...doc, ek: [{ ...doc.ek[0], certificate: cert }, ...doc.ek.slice(1)] }));
  const altered = await verifyCli(file('altered.attest'), file('hw-ek-a.pem'));
  t.not(altered.code, 0, 'an altered certificate byte fails');
  t.match(altered.stderr, /broken link: vTPM EK certificate \(RSA\) → host CA/, 'naming the EK certificate link');
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
  const v = await verifyCli(file('g12.attest'), file('hw-ek-a.pem'));
  t.equal(v.code, 0, `vtpm verify passes for the TPM 1.2 chain${v.code ? `: ${v.stderr}` : ''}`);
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
