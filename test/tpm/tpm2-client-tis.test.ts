// The TPM 2.0 client battery through the TIS driver and register model, on the emulated
// chip (libtpms in a worker) with its NVRAM in a temp state dir.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash, verify } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TPM_ALG_SHA256, TPM_RH_OWNER } from '../../drivers/tpm/tpm2.ts';
import { Tpm2Client, permanent } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import { TPMA_NV, TPM_ALG, ecdsaDer, eccPublicKey, eccSigningTemplate, eccStorageTemplate, hash, sealedDataTemplate } from '../../drivers/tpm/tpm2-structures.ts';
import { openEmulatedTpm } from '../../drivers/tpm_tis/emulated.ts';
import type { TisDriver } from '../../drivers/tpm_tis/driver.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-client-tis-'));
const stateDir = path.join(dir, 'chip');
let tpm: TisDriver | undefined;
t.teardown(async () => {
  await tpm?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function open(): Promise<Tpm2Client> {
  tpm = await openEmulatedTpm({ stateDir });
  const c = new Tpm2Client(tpm);
  await c.startup();
  return c;
}

const sel = [{ alg: TPM_ALG_SHA256, pcrs: [16] }];
const COUNTER = 0x01500010;

t.test('battery through the TIS driver', async (t) => {
  let c = await open();
  t.equal((await c.getRandom(32)).length, 32, 'GetRandom');
  const owner = permanent(TPM_RH_OWNER);
  const primary = await c.createPrimary(owner, eccStorageTemplate());
  t.ok(primary.handle >>> 24 === 0x80, 'transient primary');
  const rp = await c.readPublic(primary.handle);
  t.same(rp.name, primary.name, 'ReadPublic gives the name CreatePrimary gave');

  // A salted HMAC session (ECDH against the primary) with CFB parameter encryption.
  const hmac = await c.startAuthSession({ type: TPM_SE.HMAC, tpmKey: primary });

  await t.test('seal to a PCR policy, unseal, refused after extend', async (t) => {
    const policy = await c.pcrPolicyDigest(sel);
    const secret = new Uint8Array(Buffer.from('the manager key wrapping secret'));
    const blob = await c.create(primary, sealedDataTemplate(policy), { data: secret, session: hmac });
    const item = await c.load(primary, blob, hmac);

    const ps = await c.startAuthSession({ type: TPM_SE.POLICY, tpmKey: primary });
    await c.policyPCR(ps, sel);
    t.same(await c.policyGetDigest(ps), policy, 'policy session digest equals the sealed policy');
    t.same(await c.unseal(item, ps), secret, 'unsealed through a salted, encrypting policy session');
    await c.flushContext(ps.handle);

    await c.pcrExtend(16, [{ alg: TPM_ALG_SHA256, digest: hash(TPM_ALG.SHA256, new Uint8Array([1])) }]);
    const ps2 = await c.startAuthSession({ type: TPM_SE.POLICY, tpmKey: primary });
    await c.policyPCR(ps2, sel);
    await t.rejects(c.unseal(item, ps2), { code: 'ETPM', message: /TPM_RC_POLICY_FAIL \(session 1\)/ }, 'unseal refused after PCR extend');
    await c.flushContext(ps2.handle);
    await c.flushContext(item.handle);
  });

  await t.test('NV index: secret written and read back encrypted', async (t) => {
    const a = TPMA_NV;
    const index = 0x01500020;
    await c.nvDefineSpace({ index, nameAlg: TPM_ALG.SHA256, attributes: a.OWNERWRITE | a.OWNERREAD | a.NO_DA, authPolicy: new Uint8Array(0), dataSize: 32 }, { session: hmac });
    const data = await c.getRandom(32);
    await c.nvWrite(index, data, 0, hmac);
    t.same(await c.nvRead(index, 32, 0, hmac), data);
    await c.nvUndefineSpace(index, hmac);
  });

  await t.test('Sign, Certify, Quote (checked with openssl), EvictControl', async (t) => {
    const key = await c.load(primary, await c.create(primary, eccSigningTemplate(), { session: hmac }), hmac);
    const pubKey = eccPublicKey(key.public);

    const digest = createHash('sha256').update('message').digest();
    const sig = await c.sign(key, new Uint8Array(digest), hmac);
    t.ok(verify('sha256', Buffer.from('message'), { key: pubKey, dsaEncoding: 'der' }, ecdsaDer(sig)), 'Sign verifies');

    const cert = await c.certify(key, key, new Uint8Array([7, 7]), [hmac]);
    t.same(cert.parsed.name, key.name, 'Certify names the certified key');

    const nonce = await c.getRandom(16);
    const q = await c.quote(key, nonce, sel, hmac);
    t.same(q.parsed.extraData, nonce, 'quote carries the nonce');
    const pcrs = await c.pcrRead(sel);
    t.same(q.parsed.pcrDigest, hash(TPM_ALG.SHA256, ...pcrs.digests), 'quote digest is the PCR values');
    const pem = path.join(dir, 'quote-key.pem');
    fs.writeFileSync(pem, pubKey.export({ type: 'spki', format: 'pem' }));
    fs.writeFileSync(path.join(dir, 'attest.bin'), q.attest);
    fs.writeFileSync(path.join(dir, 'sig.der'), ecdsaDer(q.signature));
    const ok = execFileSync('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', path.join(dir, 'sig.der'), path.join(dir, 'attest.bin')]).toString();
    t.match(ok, /Verified OK/, 'openssl verifies the quote');
    const tampered = q.attest.slice();
    tampered[tampered.length - 1] ^= 1;
    fs.writeFileSync(path.join(dir, 'attest.bin'), tampered);
    const check = () => {
      execFileSync('openssl', ['dgst', '-sha256', '-verify', pem, '-signature', path.join(dir, 'sig.der'), path.join(dir, 'attest.bin')], { stdio: 'pipe' });
    };
    t.throws(check, { message: /Command failed: openssl/ }, 'openssl rejects a tampered quote');

    const persistent = 0x81000010;
    await c.evictControl(key, persistent, hmac);
    t.same((await c.readPublic(persistent)).name, key.name, 'persistent copy');
    await c.evictControl({ handle: persistent, name: key.name }, persistent, hmac);
    await t.rejects(c.readPublic(persistent), { code: 'ETPM', message: /TPM_RC_HANDLE \(handle 1\)/ }, 'evicted');
    await c.flushContext(key.handle);
  });

  await t.test('NV counter increments and survives a restart of the model', async (t) => {
    await c.nvDefineCounter(COUNTER, hmac);
    await c.nvIncrement(COUNTER, hmac);
    const first = await c.nvReadCounter(COUNTER, hmac);
    await c.nvIncrement(COUNTER, hmac);
    await c.nvIncrement(COUNTER);
    t.equal(await c.nvReadCounter(COUNTER, hmac), first + 2n);
    await c.flushContext(hmac.handle);
    await c.flushContext(primary.handle);
    await c.shutdown(false);
    await tpm!.close();
    tpm = undefined;
    t.ok(fs.readdirSync(stateDir).length > 0, 'chip NVRAM is in the state dir');
    t.equal(fs.statSync(stateDir).mode & 0o777, 0o700);
    for (const f of fs.readdirSync(stateDir)) t.equal(fs.statSync(path.join(stateDir, f)).mode & 0o777, 0o600, `${f} is 0600`);

    c = await open();
    t.equal(await c.nvReadCounter(COUNTER), first + 2n, 'counter value survived');
    await c.nvIncrement(COUNTER);
    t.equal(await c.nvReadCounter(COUNTER), first + 3n);
  });
});
