// The root key sealed to the emulated hardware TPM (real libtpms chip behind the TIS model,
// NVRAM in a temp dir): unseal after a new boot, refusal after a PCR extend (EPCR naming the
// PCRs), no PCR binding with [], damaged records, another host's TPM, and nothing left
// loaded in the TPM after success or failure.
import t from 'tap';
import * as path from 'node:path';
import { isVtpmError } from '../../drivers/base/errors.ts';
import { hash, TPM_ALG } from '../../drivers/tpm/tpm2-structures.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import {
  DEFAULT_ROOT_KEY_PCRS,
  createSealedRootKey,
  decodeSealedRootKey,
  encodeSealedRootKey,
  pcrDifferences,
  unsealRootKey,
} from '../../manager/hardware/root-key.ts';
import { extendPcr, readPcrs } from '../../manager/hardware/pcrs.ts';
import { loadedHandles, medianMs, openChip, tempDir } from './hw-chip.ts';

const dir = tempDir(t, 'vtpm-root-key-');
const hostA = path.join(dir, 'host-a');
const hostB = path.join(dir, 'host-b');
let hw: HardwareTpm | undefined;
t.teardown(async () => {
  await hw?.close();
});

async function boot(stateDir = hostA): Promise<HardwareTpm> {
  await hw?.close();
  hw = await openChip(stateDir);
  return hw;
}

const measurement = (s: string) => hash(TPM_ALG.SHA256, new Uint8Array(Buffer.from(s)));

let sealedBytes: Uint8Array;
let rootKey: Uint8Array;

t.test('seal, unseal, and again after a new boot of the host', async (t) => {
  const tpm = await boot();
  const made = await createSealedRootKey(tpm);
  rootKey = made.rootKey;
  t.equal(rootKey.length, 32, '32-byte root key');
  t.same(made.sealed.pcrs, DEFAULT_ROOT_KEY_PCRS, 'sealed to the default PCRs 0,2,4,7');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded after sealing');
  sealedBytes = encodeSealedRootKey(made.sealed);
  t.ok(sealedBytes.length < 1024, `record is ${sealedBytes.length} bytes of CBOR`);
  t.same(decodeSealedRootKey(sealedBytes), made.sealed, 'CBOR round trip');

  t.same(await unsealRootKey(tpm, made.sealed), rootKey, 'unseals from the record');
  t.same(await unsealRootKey(tpm, sealedBytes), rootKey, 'unseals from its CBOR bytes');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded after unsealing');
  const second = await createSealedRootKey(tpm);
  t.not(Buffer.from(second.rootKey).toString('hex'), Buffer.from(rootKey).toString('hex'), 'a second root key is a different key');

  const again = await boot(); // power cycle: fresh worker, same NVRAM, Startup(CLEAR)
  t.same(await unsealRootKey(again, sealedBytes), rootKey, 'unseals after the chip was closed and reopened');
  const ms = await medianMs(10, () => unsealRootKey(again, sealedBytes));
  t.comment(`unsealRootKey on the emulated chip: median ${ms.toFixed(1)} ms of 10`);
  t.same(await loadedHandles(again), [], 'nothing left loaded');
});

t.test('a sealed PCR extended: EPCR naming the PCR, nothing left loaded; a new boot heals it', async (t) => {
  const tpm = await boot();
  const before = await readPcrs(tpm, [4]);
  await extendPcr(tpm, 4, measurement('a different boot loader'));
  const after = await readPcrs(tpm, [4]);
  t.not(Buffer.from(after.get(4)!).toString('hex'), Buffer.from(before.get(4)!).toString('hex'), 'PCR 4 changed');

  const err = await unsealRootKey(tpm, sealedBytes).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(isVtpmError(err, 'EPCR'), 'refused with EPCR');
  t.match((err as Error).message, /the hardware TPM's PCR 4 differs from the values the root key was sealed to \(sealed to SHA-256 PCRs 0,2,4,7\): refusing to start/, (err as Error).message);
  t.match((err as Error & { cause: Error }).cause.message, /TPM_RC_POLICY_FAIL/, 'the TPM said POLICY_FAIL');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded after the refusal');

  const diff = await pcrDifferences(tpm, sealedBytes);
  t.same(
    diff.map((d) => d.pcr),
    [4],
    'pcrDifferences names PCR 4',
  );
  t.same(diff[0]!.current, after.get(4), 'with its current value');
  t.same(diff[0]!.sealed, new Uint8Array(32), 'and the value at seal time (zero after reset)');

  await extendPcr(tpm, 0, measurement('other firmware'));
  await t.rejects(unsealRootKey(tpm, sealedBytes), { code: 'EPCR', message: /PCRs 0,4 differ/ }, 'two PCRs named');

  const rebooted = await boot();
  t.same(await pcrDifferences(rebooted, sealedBytes), [], 'a new boot resets the PCRs');
  t.same(await unsealRootKey(rebooted, sealedBytes), rootKey, 'and unseals again');
});

t.test('pcrs [] binds to no PCR', async (t) => {
  const tpm = await boot();
  const { rootKey: key, sealed } = await createSealedRootKey(tpm, []);
  t.same(sealed.pcrs, [], 'record says: no PCR binding');
  for (const p of DEFAULT_ROOT_KEY_PCRS) await extendPcr(tpm, p, measurement(`changed ${p}`));
  t.same(await unsealRootKey(tpm, sealed), key, 'unseals whatever the PCRs are');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded');
});

t.test('PCR lists are checked and normalised', async (t) => {
  const tpm = await boot();
  await t.rejects(createSealedRootKey(tpm, [24]), { code: 'EINVAL', message: /PCR 24 is not in 0\.\.23/ });
  await t.rejects(createSealedRootKey(tpm, [1.5]), { code: 'EINVAL' });
  const { sealed } = await createSealedRootKey(tpm, [7, 0, 7, 16, 1, 2, 3, 4, 5, 6, 8, 9]);
  t.same(sealed.pcrs, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16], 'sorted and unique (more than one PCR_Read worth)');
  t.ok((await unsealRootKey(tpm, sealed)).length === 32, 'unseals');
  await extendPcr(tpm, 16, measurement('x'));
  await t.rejects(unsealRootKey(tpm, sealed), { code: 'EPCR', message: /PCR 16 differs/ });
  t.same(await loadedHandles(tpm), [], 'nothing left loaded');
});

t.test('every single flipped byte of the record is refused cleanly', async (t) => {
  const tpm = await boot();
  const codes = new Map<string, number>();
  let accepted = 0;
  for (let i = 0; i < sealedBytes.length; i++) {
    const bad = sealedBytes.slice();
    bad[i]! ^= 0x01 << (i % 8);
    try {
      await unsealRootKey(tpm, bad);
      accepted++;
      t.fail(`flip at byte ${i} was accepted`);
    } catch (e) {
      if (!isVtpmError(e)) {
        t.fail(`flip at byte ${i}: not a VtpmError: ${String(e)}`);
        continue;
      }
      codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
    }
  }
  t.equal(accepted, 0, `all ${sealedBytes.length} flips refused`);
  t.comment(`refusals by code: ${[...codes].map(([c, n]) => `${c} ${n}`).join(', ')}`);
  t.ok(codes.has('EINVAL'), 'as damaged records (EINVAL)');
  t.notOk(codes.has('EPCR'), 'never mistaken for changed PCRs');
  t.same(await loadedHandles(tpm), [], 'nothing left loaded after all of them');

  const rec = decodeSealedRootKey(sealedBytes);
  await t.rejects(unsealRootKey(tpm, { ...rec, version: 2 as 1 }), { code: 'EINVAL', message: /version 2/ }, 'another version');
  await t.rejects(unsealRootKey(tpm, new Uint8Array([0xff, 0x00])), { code: 'EINVAL', message: /not valid CBOR|not a map/ }, 'not CBOR');
  await t.rejects(unsealRootKey(tpm, new Uint8Array(5000)), { code: 'EOVERSIZE' }, 'oversized');
  t.same(await unsealRootKey(tpm, sealedBytes), rootKey, 'the intact record still unseals');
});

t.test("another host's TPM cannot unseal it", async (t) => {
  const tpm = await boot(hostB);
  await t.rejects(unsealRootKey(tpm, sealedBytes), { code: 'EPERM', message: /sealed by another hardware TPM/ });
  t.same(await loadedHandles(tpm), [], 'nothing left loaded after the refusal');
  const own = await createSealedRootKey(tpm);
  t.same(await unsealRootKey(tpm, own.sealed), own.rootKey, 'its own root key unseals there');
  const a = await boot(hostA);
  await t.rejects(unsealRootKey(a, own.sealed), { code: 'EPERM' }, "and host A's TPM cannot unseal host B's");
  t.same(await loadedHandles(a), [], 'nothing left loaded');
});

t.test('the root key never crosses the bus in clear (sealed in, unsealed out)', async (t) => {
  const tpm = await boot();
  const wire: Uint8Array[] = [];
  const tap: HardwareTpm = {
    description: `tap on ${tpm.description}`,
    async transmit(cmd, locality) {
      wire.push(cmd.slice());
      const resp = await tpm.transmit(cmd, locality);
      wire.push(resp.slice());
      return resp;
    },
    close: () => tpm.close(),
  };
  const made = await createSealedRootKey(tap);
  t.same(await unsealRootKey(tap, made.sealed), made.rootKey, 'unsealed through the tap');
  t.ok(wire.length > 10, `${wire.length} command and response buffers seen`);
  const key = Buffer.from(made.rootKey);
  // Any 8-byte window of the key would show a leak; none may appear in any buffer.
  const leaks = wire.filter((b) => {
    const buf = Buffer.from(b);
    for (let i = 0; i + 8 <= key.length; i++) if (buf.includes(key.subarray(i, i + 8))) return true;
    return false;
  });
  t.equal(leaks.length, 0, 'no buffer on the bus holds any 8 bytes of the root key');
});
