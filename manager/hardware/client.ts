// The manager's view of the hardware TPM as a TPM 2.0 client: one Tpm2Client per
// HardwareTpm, started once (TPM2_Startup(CLEAR) after power-on; a TPM that firmware or
// an earlier run already started answers TPM_RC_INITIALIZE, which Tpm2Client.startup()
// takes as "already started"), and a guard that flushes what a step loaded into the TPM,
// on success and on failure alike.
import { VtpmError, describeError } from '../../drivers/base/errors.ts';
import { TpmResponseError } from '../../drivers/tpm/command.ts';
import { Tpm2Client, permanent, type LoadedObject } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_RH_OWNER } from '../../drivers/tpm/tpm2.ts';
import { eccStorageTemplate } from '../../drivers/tpm/tpm2-structures.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';

/** Either the raw seam or a client already built on it. */
export type HardwareLike = HardwareTpm | Tpm2Client;

const started = new WeakMap<HardwareTpm, Promise<void>>();

/** The client for `hw`, with the TPM started (once per HardwareTpm). */
export async function hardwareClient(hw: HardwareLike): Promise<Tpm2Client> {
  const client = hw instanceof Tpm2Client ? hw : new Tpm2Client(hw);
  let p = started.get(client.tpm);
  if (!p) {
    p = client.startup().then(() => undefined);
    started.set(client.tpm, p);
    p.catch(() => started.delete(client.tpm));
  }
  await p;
  return client;
}

/** Run `body` with a list it pushes loaded handles (objects, sessions) onto; every one is
 *  flushed afterwards, newest first, on success and on failure. A failing flush after a
 *  failed body does not hide the body's own error. */
export async function withFlush<T>(client: Tpm2Client, body: (loaded: number[]) => Promise<T>): Promise<T> {
  const loaded: number[] = [];
  let result: T;
  try {
    result = await body(loaded);
  } catch (e) {
    await flushAll(client, loaded).catch(() => undefined);
    throw e;
  }
  await flushAll(client, loaded);
  return result;
}

async function flushAll(client: Tpm2Client, loaded: number[]): Promise<void> {
  let first: unknown;
  for (const h of loaded.splice(0).reverse()) {
    try {
      await client.flushContext(h);
    } catch (e) {
      first ??= e;
    }
  }
  if (first !== undefined) throw new VtpmError('ETPM', `could not flush a handle from the hardware TPM: ${describeError(first)}`, { cause: first });
}

/** The owner storage primary from the fixed template: the same key every time on one TPM
 *  (until the owner seed changes), so children created under it load again later. */
export async function ownerStoragePrimary(c: Tpm2Client, loaded: number[], ownerAuth?: Uint8Array): Promise<LoadedObject> {
  const primary = await c.createPrimary(permanent(TPM_RH_OWNER, ownerAuth), eccStorageTemplate());
  loaded.push(primary.handle);
  return primary;
}

/** Whether `e` is the TPM answering format-1 error `base` (e.g. 0x01d TPM_RC_POLICY_FAIL),
 *  whichever handle, session or parameter number the TPM added. */
export function isTpmRc(e: unknown, base: number): e is TpmResponseError {
  return e instanceof TpmResponseError && (e.rc & 0x80) !== 0 && (e.rc & 0x3f) === base;
}
