// `vtpm stop` is an orderly shutdown to the TPM (TPM2_Shutdown(STATE) / TPM_SaveState
// before the engine ends), so stop/start cycles do not count as dictionary-attack failures:
// a guest's DA-protected keys and sealed blobs still work after many restarts. Only a crash
// may count as a non-orderly start. Through the CLI and the real node, no mocks.
//
// libtpms (USE_DA_USED) counts a non-orderly start as one DA failure when a DA-protected
// authorisation was checked in the power cycle before it, so every cycle here uses the
// password-protected sealed blob, as clevis' tpm2 pin does at each boot.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import { ToolFailed, describe, type Tap } from '../clients/run.ts';
import { tpm2Tools, type Tpm2Tools } from '../clients/tpm2-tools.ts';
import { TestHost, transact } from './host.ts';
import { newestSlot } from '../manager/store-fixtures.ts';

const PASS = 'pass';

/** TPM2_PT_LOCKOUT_COUNTER, TPMA_PERMANENT.inLockout and TPMA_STARTUP_CLEAR.orderly (libtpms
 *  sets it when the start followed a TPM2_Shutdown) from `tpm2_getcap properties-variable`. */
async function daState(c: Tpm2Tools): Promise<{ counter: number; inLockout: number; orderly: number; yaml: string }> {
  const yaml = (await c.run('getcap', ['properties-variable'])).stdout;
  const counter = /TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-fA-F]+|\d+)/.exec(yaml)?.[1];
  const flag = (name: string) => Number(new RegExp(`${name}:\\s*(\\d+)`).exec(yaml)?.[1] ?? NaN);
  return { counter: counter === undefined ? NaN : Number(counter), inLockout: flag('inLockout'), orderly: flag('orderly'), yaml };
}

/** A tool failure fails the test with the tool's transcript, not a bare rejection. */
async function tools(t: Tap, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof ToolFailed) t.fail('tool failed', { diagnostic: true, transcript: describe(e.result) });
    else throw e;
  }
}

const vtpmdLog = (host: TestHost, name: string) => readFileSync(join(host.dir, name, 'vtpmd.log'), 'utf8');
/** Orderly shutdowns vtpmd logged so far (`vtpm create` runs an instance once to endorse it). */
const orderlyStops = (host: TestHost, name: string, tpm: '1.2' | '2.0') => (vtpmdLog(host, name).match(tpm === '2.0' ? /TPM 2\.0 shut down \(orderly\)/g : /TPM 1\.2 shut down \(orderly\)/g) ?? []).length;

/** The manager's newest slot for blob `blob` of instance `uuid`: absent, a blob, or a
 *  tombstone (what a delete leaves, so an old copy cannot be put back). */
function blobFile(host: TestHost, uuid: string, blob: string): 'absent' | 'blob' | 'tombstone' {
  const rec = newestSlot(join(host.stateDir, 'instances', uuid), blob)?.env;
  if (!rec) return 'absent';
  return rec.deleted === true ? 'tombstone' : rec.ct && rec.ct.length > 0 ? 'blob' : 'tombstone';
}

for (const cycle of ['instance', 'host'] as const) t.test(`TPM 2.0: 10 ${cycle === 'host' ? 'whole-host ' : ''}stop/start cycles leave the DA lockout counter at 0; the key signs, the blob unseals`, async (t) => {
  const host = new TestHost(t);
  const name = cycle === 'host' ? 'dahost' : 'da';
  const node = await host.start(t, name, '2.0');
  const stopsBefore = orderlyStops(host, name, '2.0');
  const c = tpm2Tools(t, `device:${node}`);
  const secret = randomBytes(32).toString('hex');
  const msg = c.writeFile('msg', randomBytes(100));

  await tools(t, async () => {
    const before = await daState(c);
    t.equal(before.counter, 0, 'a fresh TPM: lockout counter 0');

    // Primary, a password-protected signing key and a password-protected sealed blob (no
    // noDA attribute: both are DA-protected). Only the pub/priv files are kept: the primary
    // is recreated from the owner seed after the restarts.
    const primary = await c.createPrimary('ecc256');
    const keyPub = c.file('key.pub');
    const keyPriv = c.file('key.priv');
    await c.run('create', ['-C', primary.ctx, '-G', 'ecc256', '-p', PASS, '-u', keyPub, '-r', keyPriv, '-Q']);
    await c.flush();
    const sealPub = c.file('seal.pub');
    const sealPriv = c.file('seal.priv');
    await c.run('create', ['-C', primary.ctx, '-i', c.writeFile('secret.txt', secret), '-p', PASS, '-u', sealPub, '-r', sealPriv, '-Q']);
    await c.flush();

    /** Recreate the primary and load pub/priv under it; the loaded object's context file. */
    const load = async (pub: string, priv: string): Promise<string> => {
      const p = await c.createPrimary('ecc256');
      t.equal(p.name.toString('hex'), primary.name.toString('hex'), 'the same primary (owner seed kept)');
      const ctx = c.file('obj.ctx');
      await c.run('load', ['-C', p.ctx, '-u', pub, '-r', priv, '-c', ctx, '-Q']);
      await c.flush();
      return ctx;
    };
    /** Load (tpm2_load needs the primary's DA-protected auth) and unseal; a refusal of
     *  either is returned with what the tool said. */
    const unseal = async (): Promise<{ code: number | null; data: string; stderr: string }> => {
      try {
        const ctx = await load(sealPub, sealPriv);
        const out = c.file('unsealed');
        const r = await c.try('unseal', ['-c', ctx, '-p', PASS, '-o', out]);
        return { code: r.code, data: r.code === 0 ? readFileSync(out, 'utf8') : '', stderr: `tpm2_unseal: ${r.stderr}` };
      } catch (e) {
        if (!(e instanceof ToolFailed)) throw e;
        return { code: e.result.code, data: '', stderr: `${e.result.cmd}: ${e.result.stderr}` };
      } finally {
        await c.flush();
      }
    };

    const first = await unseal();
    t.equal(first.data, secret, 'the blob unseals with its password before any restart');

    // Every cycle runs, so a failure shows how the counter climbs (and where unseal stops).
    const counters: number[] = [];
    const orderly: number[] = [];
    const unseals: string[] = [];
    for (let i = 1; i <= 10; i++) {
      if (cycle === 'host') await host.hostRestart(t); // stops the instance as part of the host
      else await host.stop(t, name);
      await host.start(t, name, '2.0');
      const da = await daState(c);
      counters.push(da.counter);
      orderly.push(da.orderly);
      // A DA-protected use in every power cycle, so a non-orderly start would count.
      const u = await unseal();
      unseals.push(u.code === 0 && u.data === secret ? 'ok' : `${u.stderr.split(':')[0]} failed (${/0x[0-9a-f]{3,}/i.exec(u.stderr)?.[0] ?? `exit ${u.code}`})`);
    }
    t.same(counters, Array(10).fill(0), `lockout counter after each start: ${counters.join(' ')}`);
    t.same(orderly, Array(10).fill(1), `TPMA_STARTUP_CLEAR.orderly after each start: ${orderly.join(' ')}`);
    t.same(unseals, Array(10).fill('ok'), `unseal after each start: ${unseals.join(', ')}`);

    const after = await daState(c);
    t.equal(after.counter, 0, 'TPM2_PT_LOCKOUT_COUNTER is 0 after the cycles');
    t.equal(after.inLockout, 0, 'inLockout is 0');
    if (after.counter !== 0 || after.inLockout !== 0) t.comment(after.yaml);

    const key = await load(keyPub, keyPriv);
    const sig = c.file('sig.bin');
    await c.run('sign', ['-c', key, '-p', PASS, '-g', 'sha256', '-o', sig, msg]);
    await c.flush();
    await c.run('verifysignature', ['-c', key, '-g', 'sha256', '-m', msg, '-s', sig]);
    await c.flush();
    t.pass('the key loads and signs with its password; the signature verifies');

    const last = await unseal();
    t.equal(last.code, 0, `tpm2_unseal -p pass succeeds${last.code ? `: ${last.stderr.trim()}` : ''}`);
    t.equal(last.data, secret, 'the sealed blob unseals to the same secret');
  });

  const log = vtpmdLog(host, name);
  t.notMatch(log, /shutdown failed/, 'the vtpmd log shows no shutdown failure');
  t.equal(orderlyStops(host, name, '2.0') - stopsBefore, 10, 'vtpmd logged an orderly shutdown for every stop');
});

t.test('TPM 1.2: 3 stop/start cycles, SaveState on every stop, the TPM still answers', async (t) => {
  const host = new TestHost(t);
  const name = 'sv12';
  const node = await host.start(t, name, '1.2');
  const stopsBefore = orderlyStops(host, name, '1.2');
  const { uuid } = await host.row(name);
  const pcr = 16;
  for (let i = 1; i <= 3; i++) {
    tpm12.parseExtend(transact(node, tpm12.extend(pcr, randomBytes(20))));
    await host.stop(t, name);
    // TPM_SaveState's blob reaches the StateStore through libtpms' storedata callback ...
    t.equal(blobFile(host, uuid, 'savestate'), 'blob', `cycle ${i}: the stop left the "savestate" blob in the state dir`);
    await host.start(t, name, '1.2');
    // ... and Startup(CLEAR) invalidates (deletes) it again, as TPM 1.2 requires.
    t.equal(blobFile(host, uuid, 'savestate'), 'tombstone', `cycle ${i}: Startup(CLEAR) deleted it (the manager keeps a tombstone)`);
    const value = tpm12.parsePcrRead(transact(node, tpm12.pcrRead(pcr)));
    t.equal(Buffer.from(value).toString('hex'), '00'.repeat(20), `cycle ${i}: PCR ${pcr} reset by Startup(CLEAR)`);
  }
  const ver = tpm12.parseVersionInfo(tpm12.parseGetCapability(transact(node, tpm12.getCapability(tpm12.TPM_CAP_VERSION_VAL))));
  t.match(ver.version, /^1\.2 /, `TPM_GetCapability(VERSION_VAL) answers: ${ver.version}, vendor ${ver.vendor}`);
  const log = vtpmdLog(host, name);
  t.notMatch(log, /shutdown failed/, 'the vtpmd log shows no shutdown failure');
  t.equal(orderlyStops(host, name, '1.2') - stopsBefore, 3, 'vtpmd logged an orderly SaveState for each stop');
});
