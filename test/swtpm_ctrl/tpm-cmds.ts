// TPM 2.0 commands the swtpm_ctrl tests (and the guest's /init) send, built on the command
// framing; owner auth and NV auth are empty.
import { createHash } from 'node:crypto';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { Reader } from '../../drivers/tpm/marshal.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

export const NV_INDEX = 0x01500017;
/** TPMA_NV_OWNERWRITE | OWNERREAD | AUTHWRITE | AUTHREAD. */
const NV_ATTRS = 0x00060006;

export const sha256 = (...b: Uint8Array[]) => createHash('sha256').update(Buffer.concat(b)).digest();

export function nvDefine(size: number, index = NV_INDEX): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_DefineSpace, (w) => {
    w.u32(tpm2.TPM_RH_OWNER);
    tpm2.writePasswordAuth(w);
    w.sized16(new Uint8Array(0));
    const pub = w.mark16();
    const start = w.length;
    w.u32(index).u16(tpm2.TPM_ALG_SHA256).u32(NV_ATTRS).sized16(new Uint8Array(0)).u16(size);
    w.patch16(pub, w.length - start);
  });
}

export function nvWrite(data: Uint8Array, index = NV_INDEX): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_Write, (w) => {
    w.u32(index).u32(index);
    tpm2.writePasswordAuth(w);
    w.sized16(data).u16(0);
  });
}

export function nvRead(size: number, index = NV_INDEX): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_Read, (w) => {
    w.u32(index).u32(index);
    tpm2.writePasswordAuth(w);
    w.u16(size).u16(0);
  });
}

/** The data of an NV_Read response (after the parameter size). */
export function parseNvRead(resp: Uint8Array): Uint8Array {
  const r = new Reader(resp, 10);
  r.u32('parameterSize');
  return r.sized16('data').slice();
}

export function pcrRead256(pcr: number): Uint8Array {
  return tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [pcr] }]);
}

/** The one digest of a one-PCR, one-bank PCR_Read response. */
export function pcrValue(resp: Uint8Array): Buffer {
  return Buffer.from(tpm2.parsePcrRead(resp).digests[0]!);
}

export function extend256(pcr: number, digest: Uint8Array): Uint8Array {
  return tpm2.pcrExtend(pcr, [{ alg: tpm2.TPM_ALG_SHA256, digest }]);
}
