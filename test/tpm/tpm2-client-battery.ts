// The TPM 2.0 client battery, shared by every HardwareTpm test (TIS driver, device node):
// seal to a PCR policy and unseal, refusal after an extend, an encrypted NV secret, Sign,
// Certify, Quote checked by openssl, EvictControl, and an NV counter.
import type { Test } from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash, verify } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TPM_ALG_SHA256, TPM_RH_OWNER } from '../../drivers/tpm/tpm2.ts';
import { type Tpm2Client, permanent } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import { TPMA_NV, TPM_ALG, ecdsaDer, eccPublicKey, eccSigningTemplate, eccStorageTemplate, hash, sealedDataTemplate } from '../../drivers/tpm/tpm2-structures.ts';

export const SEL = [{ alg: TPM_ALG_SHA256, pcrs: [16] }];

/** Runs the battery as subtests of `t`; returns the counter's value when done. */
export async function clientBattery(t: Test, c: Tpm2Client, opts: { dir: string; counterIndex: number }): Promise<bigint> {
  t.equal((await c.getRandom(32)).length, 32, 'GetRandom');
  const primary = await c.createPrimary(permanent(TPM_RH_OWNER), eccStorageTemplate());
  t.equal(primary.handle >>> 24, 0x80, 'transient primary');
  t.same((await c.readPublic(primary.handle)).name, primary.name, 'ReadPublic gives the name CreatePrimary gave');
  // A salted HMAC session (ECDH against the primary) with CFB parameter encryption.
  const hmac = await c.startAuthSession({ type: TPM_SE.HMAC, tpmKey: primary });
  let counter = 0n;
  try {
    await t.test('seal to a PCR policy, unseal, refused after extend', async (t) => {
      const policy = await c.pcrPolicyDigest(SEL);
      const secret = new Uint8Array(Buffer.from('the manager key wrapping secret'));
      const item = await c.load(primary, await c.create(primary, sealedDataTemplate(policy), { data: secret, session: hmac }), hmac);
      const ps = await c.startAuthSession({ type: TPM_SE.POLICY, tpmKey: primary });
      await c.policyPCR(ps, SEL);
      t.same(await c.policyGetDigest(ps), policy, 'policy session digest equals the sealed policy');
      t.same(await c.unseal(item, ps), secret, 'unsealed through a salted, encrypting policy session');
      await c.flushContext(ps.handle);

      await c.pcrExtend(16, [{ alg: TPM_ALG_SHA256, digest: hash(TPM_ALG.SHA256, new Uint8Array([1])) }]);
      const ps2 = await c.startAuthSession({ type: TPM_SE.POLICY, tpmKey: primary });
      await c.policyPCR(ps2, SEL);
      await t.rejects(c.unseal(item, ps2), { code: 'ETPM', message: /TPM_RC_POLICY_FAIL \(session 1\)/ }, 'unseal refused after PCR extend');
      await c.flushContext(ps2.handle);
      await c.flushContext(item.handle);
    });

    await t.test('NV index: secret written and read back encrypted', async (t) => {
      const a = TPMA_NV;
      const index = opts.counterIndex + 1;
      await c.nvDefineSpace({ index, nameAlg: TPM_ALG.SHA256, attributes: a.OWNERWRITE | a.OWNERREAD | a.NO_DA, authPolicy: new Uint8Array(0), dataSize: 32 }, { session: hmac });
      const data = await c.getRandom(32);
      await c.nvWrite(index, data, 0, hmac);
      t.same(await c.nvRead(index, 32, 0, hmac), data);
      await c.nvUndefineSpace(index, hmac);
    });

    await t.test('Sign, Certify, Quote (checked with openssl), EvictControl', async (t) => {
      const key = await c.load(primary, await c.create(primary, eccSigningTemplate(), { session: hmac }), hmac);
      const pubKey = eccPublicKey(key.public);
      const sig = await c.sign(key, new Uint8Array(createHash('sha256').update('message').digest()), hmac);
      t.ok(verify('sha256', Buffer.from('message'), { key: pubKey, dsaEncoding: 'der' }, ecdsaDer(sig)), 'Sign verifies');
      const cert = await c.certify(key, key, new Uint8Array([7, 7]), [hmac]);
      t.same(cert.parsed.name, key.name, 'Certify names the certified key');

      const nonce = await c.getRandom(16);
      const q = await c.quote(key, nonce, SEL, hmac);
      t.same(q.parsed.extraData, nonce, 'quote carries the nonce');
      const pcrs = await c.pcrRead(SEL);
      t.same(q.parsed.pcrDigest, hash(TPM_ALG.SHA256, ...pcrs.digests), 'quote digest is the PCR values');
      const pem = path.join(opts.dir, 'quote-key.pem');
      const attest = path.join(opts.dir, 'attest.bin');
      const sigFile = path.join(opts.dir, 'sig.der');
      fs.writeFileSync(pem, pubKey.export({ type: 'spki', format: 'pem' }));
      fs.writeFileSync(attest, q.attest);
      fs.writeFileSync(sigFile, ecdsaDer(q.signature));
      const openssl = () => execFileSync('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', sigFile, attest], { stdio: 'pipe' }).toString();
      t.match(openssl(), /Verified OK/, 'openssl verifies the quote');
      const tampered = q.attest.slice();
      tampered[tampered.length - 1]! ^= 1;
      fs.writeFileSync(attest, tampered);
      t.throws(openssl, { message: /Command failed: openssl/ }, 'openssl rejects a tampered quote');

      const persistent = 0x81000010;
      await c.evictControl(key, persistent, hmac);
      t.same((await c.readPublic(persistent)).name, key.name, 'persistent copy');
      await c.evictControl({ handle: persistent, name: key.name }, persistent, hmac);
      await t.rejects(c.readPublic(persistent), { code: 'ETPM', message: /TPM_RC_HANDLE \(handle 1\)/ }, 'evicted');
      await c.flushContext(key.handle);
    });

    await t.test('NV counter increments', async (t) => {
      await c.nvDefineCounter(opts.counterIndex, hmac);
      await c.nvIncrement(opts.counterIndex, hmac);
      const first = await c.nvReadCounter(opts.counterIndex, hmac);
      await c.nvIncrement(opts.counterIndex, hmac);
      await c.nvIncrement(opts.counterIndex); // password session works too
      counter = await c.nvReadCounter(opts.counterIndex, hmac);
      t.equal(counter, first + 2n);
    });
  } finally {
    await c.flushContext(hmac.handle);
    await c.flushContext(primary.handle);
  }
  return counter;
}
