// The TPM 2.0 acceptance battery: real tpm2-tools against one TCTI, one t.test per step so
// a failure names the step. Every value the TPM returns is compared with one computed
// here. The battery leaves no NV index, persistent key, object or session behind, so it
// can run again on the same TPM.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { sha256, tpm2Tools, type Tpm2ToolsOptions } from './tpm2-tools.ts';
import { ToolFailed, describe, type Tap } from './run.ts';

export interface Tpm2BatteryOptions extends Tpm2ToolsOptions {
  /** resettable PCR used for extend and for the sealing policy (16 and 23 are resettable) */
  pcr?: number;
  nvIndex?: number;
  persistentHandle?: number;
}

const hex = (n: number): string => '0x' + n.toString(16);

export async function runTpm2Battery(t: Tap, tcti: string, opts: Tpm2BatteryOptions = {}): Promise<void> {
  const pcr = opts.pcr ?? 16;
  const nvIndex = opts.nvIndex ?? 0x01500016;
  const persistent = opts.persistentHandle ?? 0x81000016;
  const c = tpm2Tools(t, tcti, opts);

  // A failing tool's transcript goes to the failing step's diagnostics, then the step fails.
  const step = (name: string, fn: (t: Tap) => Promise<void>): Promise<unknown> =>
    t.test(name, async (st) => {
      try {
        await fn(st);
      } catch (e) {
        if (e instanceof ToolFailed) st.fail(`${name}: tool failed`, { diagnostic: true, transcript: describe(e.result) });
        else throw e;
      } finally {
        // leave nothing loaded for the next step, even when this one failed half way
        await c.flush().catch((e: unknown) => st.comment(`flush after ${name} failed: ${String(e)}`));
      }
    });

  await step('getrandom 16 bytes', async (t) => {
    const a = await c.getRandom(16);
    const b = await c.getRandom(16);
    t.equal(a.length, 16, 'first call returns 16 bytes');
    t.equal(b.length, 16, 'second call returns 16 bytes');
    t.not(a.toString('hex'), b.toString('hex'), 'two calls differ');
  });

  await step('selftest', async (t) => {
    await c.run('selftest', ['--fulltest']);
    const r = await c.run('gettestresult', []);
    t.match(r.stdout, /status:\s*success/, 'test result reports success');
  });

  await step('getcap properties-fixed and pcrs', async (t) => {
    const fixed = (await c.run('getcap', ['properties-fixed'])).stdout;
    t.match(fixed, /TPM2_PT_FAMILY_INDICATOR:\s*\n\s*raw: 0x322E3000\s*\n\s*value: "2.0"/, 'family is "2.0"');
    t.match(fixed, /TPM2_PT_PCR_COUNT:\s*\n\s*raw: 0x18/, '24 PCRs');
    const pcrs = (await c.run('getcap', ['pcrs'])).stdout;
    const bank = /sha256:\s*\[([^\]]*)\]/.exec(pcrs);
    t.ok(bank, 'a sha256 bank is allocated');
    const allocated = (bank?.[1] ?? '').split(',').map((s) => Number(s.trim()));
    t.same(allocated, [...Array(24).keys()], 'sha256 bank holds PCRs 0..23');
  });

  await step('pcrread', async (t) => {
    const r = await c.run('pcrread', [`sha256:0,${pcr}`]);
    t.match(r.stdout, /sha256:\s*\n\s*0\s*: 0x[0-9A-F]{64}/, 'PCR 0 printed with a 32-byte value');
    const v = await c.pcrRead(0);
    t.equal(v.length, 32, 'PCR 0 is 32 bytes');
  });

  await step(`pcrextend PCR ${pcr} then pcrread (value checked)`, async (t) => {
    const before = await c.pcrRead(pcr);
    const digest = sha256(randomBytes(64));
    await c.pcrExtend(pcr, digest);
    const after = await c.pcrRead(pcr);
    t.equal(after.toString('hex'), sha256(before, digest).toString('hex'), 'new = sha256(old || digest)');
  });

  await step('createprimary, create, load, sign, verifysignature', async (t) => {
    const primary = await c.createPrimary('rsa2048');
    t.equal(primary.name.length, 34, 'primary has a sha256 name');
    const pub = c.file('key.pub');
    const priv = c.file('key.priv');
    await c.run('create', ['-C', primary.ctx, '-G', 'rsa2048', '-u', pub, '-r', priv, '-Q']);
    await c.flush();
    const key = c.file('key.ctx');
    await c.run('load', ['-C', primary.ctx, '-u', pub, '-r', priv, '-c', key, '-Q']);
    await c.flush();
    const msg = c.writeFile('msg', randomBytes(200));
    const sig = c.file('sig.bin');
    await c.run('sign', ['-c', key, '-g', 'sha256', '-o', sig, msg]);
    await c.flush();
    t.ok(readFileSync(sig).length > 256, 'signature written');
    await c.run('verifysignature', ['-c', key, '-g', 'sha256', '-m', msg, '-s', sig]);
    t.pass('signature verifies over the signed message');
    await c.flush();
    const other = c.writeFile('msg2', randomBytes(200));
    const bad = await c.try('verifysignature', ['-c', key, '-g', 'sha256', '-m', other, '-s', sig]);
    t.not(bad.code, 0, 'the same signature over another message is refused');
    t.match(bad.stderr, /0x2db|signature is not valid/i, 'refused as TPM_RC_SIGNATURE');
  });

  await step('nvdefine, nvwrite, nvread, nvundefine (content checked)', async (t) => {
    if ((await c.handles('nv-index')).includes(nvIndex)) {
      t.comment(`NV index ${hex(nvIndex)} left by an earlier run: undefined first`);
      await c.nvUndefine(nvIndex);
    }
    const content = randomBytes(48);
    await c.nvWrite(nvIndex, content);
    t.ok((await c.handles('nv-index')).includes(nvIndex), 'index listed after nvdefine');
    const back = await c.nvRead(nvIndex, content.length);
    t.equal(back.toString('hex'), content.toString('hex'), 'nvread returns what nvwrite wrote');
    await c.nvUndefine(nvIndex);
    t.notOk((await c.handles('nv-index')).includes(nvIndex), 'index gone after nvundefine');
  });

  await step(`seal to PCR ${pcr} policy, unseal, refused after pcrextend`, async (t) => {
    const pcrFile = c.file('pcr.bin');
    await c.run('pcrread', [`sha256:${pcr}`, '-o', pcrFile]);
    const trial = c.file('trial.ctx');
    const policy = c.file('pcr.policy');
    await c.run('startauthsession', ['-S', trial]);
    await c.run('policypcr', ['-S', trial, '-l', `sha256:${pcr}`, '-f', pcrFile, '-L', policy]);
    await c.flushFile(trial);
    await c.flush();
    const primary = await c.createPrimary('rsa2048');
    const secret = randomBytes(32);
    const pub = c.file('seal.pub');
    const priv = c.file('seal.priv');
    await c.run('create', ['-C', primary.ctx, '-L', policy, '-i', c.writeFile('secret', secret), '-u', pub, '-r', priv, '-Q']);
    await c.flush();
    const sealed = c.file('seal.ctx');
    await c.run('load', ['-C', primary.ctx, '-u', pub, '-r', priv, '-c', sealed, '-Q']);
    await c.flush();

    const unseal = async (): Promise<{ ok: boolean; data: Buffer | null; stderr: string }> => {
      const session = c.file('policy.ctx');
      await c.run('startauthsession', ['--policy-session', '-S', session]);
      await c.run('policypcr', ['-S', session, '-l', `sha256:${pcr}`]);
      const out = c.file('unsealed');
      const r = await c.try('unseal', ['-c', sealed, '-p', `session:${session}`, '-o', out]);
      await c.flushFile(session);
      await c.flush();
      return { ok: r.code === 0, data: r.code === 0 ? readFileSync(out) : null, stderr: r.stderr };
    };

    const first = await unseal();
    t.ok(first.ok, 'unseal succeeds while the PCR holds the sealed value');
    t.equal(first.data?.toString('hex'), secret.toString('hex'), 'unsealed content is the secret');
    await c.pcrExtend(pcr, sha256(Buffer.from('change the policy PCR')));
    const second = await unseal();
    t.notOk(second.ok, 'unseal refused after the PCR moved');
    t.equal(second.data, null, 'no content released');
    t.match(second.stderr, /0x99d|policy check failed/i, 'refused as a policy check failure');
  });

  await step('hash (checked against sha256 computed here)', async (t) => {
    // > 1024 bytes makes tpm2_hash use a hash sequence (several commands), not one TPM2_Hash
    for (const size of [100, 3000]) {
      const data = randomBytes(size);
      const out = c.file('hash.bin');
      await c.run('hash', ['-C', 'o', '-g', 'sha256', '-o', out, '-t', c.file('hash.tkt'), c.writeFile('hash.in', data)]);
      t.equal(readFileSync(out).toString('hex'), sha256(data).toString('hex'), `digest of ${size} bytes`);
    }
  });

  await step(`evictcontrol + readpublic on ${hex(persistent)}`, async (t) => {
    if ((await c.handles('persistent')).includes(persistent)) {
      t.comment(`persistent handle ${hex(persistent)} left by an earlier run: evicted first`);
      await c.evict(persistent);
    }
    const { ctx, name } = await c.createPrimary('rsa2048');
    const r = await c.run('evictcontrol', ['-C', 'o', '-c', ctx, hex(persistent)]);
    t.match(r.stdout, /action: persisted/, 'evictcontrol persisted the key');
    await c.flush();
    t.ok((await c.handles('persistent')).includes(persistent), 'handle listed as persistent');
    t.same((await c.handles('transient')).length, 0, 'no transient objects left');
    const pub = await c.run('readpublic', ['-c', hex(persistent)]);
    t.match(pub.stdout, /type:\s*\n\s*value: rsa/, 'readpublic shows an RSA key');
    t.equal((await c.readPersistent(persistent))?.toString('hex'), name.toString('hex'), 'persistent key has the primary\'s name');
    await c.evict(persistent);
    t.equal(await c.readPersistent(persistent), null, 'evicted again: handle free for the next run');
  });
}
