// Shared pieces of the resource-manager tests: a real libtpms engine (started up) as the
// SyncTransport, the RM over it, and a Tpm2Client per space.
import { createHash, randomBytes, verify } from 'node:crypto';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';
import { engineTransport } from '../../drivers/tpm/adapters.ts';
import { bootTpm } from '../../drivers/tpm/boot.ts';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import { permanent, Tpm2Client, type LoadedObject } from '../../drivers/tpm/tpm2-client.ts';
import { eccPublicKey, eccSigningTemplate, ecdsaDer } from '../../drivers/tpm/tpm2-structures.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import type { HardwareTpm, SyncTransport } from '../../drivers/tpm/transport.ts';
import { ResourceManager } from '../../drivers/tpmrm/resource-manager.ts';
import type { Space } from '../../drivers/tpmrm/space.ts';
import type { AuthSession } from '../../drivers/tpm/tpm2-session.ts';

export function startEngine(): SyncTransport {
  const engine = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  bootTpm(engine, { selfTest: false });
  return engineTransport(engine);
}

/** The write failed with this errno (what a tpmrm0 client sees). */
export class WriteFailed extends Error {
  constructor(readonly errno: number) {
    super(`write failed with errno ${errno}`);
  }
}

/** One space as a HardwareTpm, so Tpm2Client can drive it. */
export function spaceTpm(rm: ResourceManager, space: Space): HardwareTpm {
  return {
    description: `space ${space.id}`,
    async transmit(cmd) {
      const r = rm.execute(space, cmd.slice());
      if (typeof r === 'number') throw new WriteFailed(-r);
      return r.slice();
    },
    async close() {
      rm.closeSpace(space);
    },
  };
}

export function spaceClient(rm: ResourceManager, space: Space): Tpm2Client {
  return new Tpm2Client(spaceTpm(rm, space));
}

export const rcOf = (rsp: Uint8Array): number => Buffer.from(rsp.buffer, rsp.byteOffset, rsp.byteLength).readUInt32BE(6);

/** Handles of one type the TPM lists (GetCapability(HANDLES) from `first`). */
export function listHandles(run: (cmd: Uint8Array) => Uint8Array, first: number): number[] {
  return tpm2.parseGetCapability(run(tpm2.getCapability(tpm2.TPM_CAP_HANDLES, first, 64))).list ?? [];
}

export const TRANSIENT = 0x80000000;
export const LOADED_SESSION = 0x02000000;
export const SAVED_SESSION = 0x03000000;

/** A P-256 signing primary of its own: random bytes in the template's unique field make
 *  the key differ from every other (primaries are derived from the template). */
export async function signingKey(c: Tpm2Client, session?: AuthSession): Promise<LoadedObject> {
  const base = eccSigningTemplate(); // ends with unique = two empty TPM2Bs
  const template = Buffer.concat([base.subarray(0, base.length - 4), Buffer.from([0, 32]), randomBytes(32), Buffer.from([0, 0])]);
  return c.createPrimary(permanent(tpm2.TPM_RH_OWNER), new Uint8Array(template), session);
}

/** Sign sha256(message) with `key` and check the signature with the key's public part. */
export async function signVerifies(c: Tpm2Client, key: LoadedObject, message: Buffer, session?: AuthSession): Promise<boolean> {
  const digest = createHash('sha256').update(message).digest();
  const sig = await c.sign(key, new Uint8Array(digest), session);
  return verify('sha256', message, { key: eccPublicKey(key.public), dsaEncoding: 'der' }, ecdsaDer(sig));
}

/** A Sign command naming `handle` (empty password, a zero digest): for handle checks. */
export function signCommand(handle: number): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.Sign, (w) => {
    w.u32(handle);
    tpm2.writePasswordAuth(w);
    w.sized16(new Uint8Array(32)).u16(0x0010).u16(0x8024).u32(tpm2.TPM_RH_NULL).sized16(new Uint8Array(0));
  });
}

export function flushCommand(handle: number): Uint8Array {
  return buildCommand(tpm2.TPM_ST_NO_SESSIONS, tpm2.TPM_CC.FlushContext, (w) => w.u32(handle));
}

export function contextSaveCommand(handle: number): Uint8Array {
  return buildCommand(tpm2.TPM_ST_NO_SESSIONS, tpm2.TPM_CC.ContextSave, (w) => w.u32(handle));
}
