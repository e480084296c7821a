// TPM 2.0 commands attestation provisioning needs beyond the client's (tpm2-client.ts):
// NV indices defined and written by the *platform* hierarchy (a TPM maker's EK
// certificates, which the owner can read but not remove), reads authorised by the index
// itself (what tpm2_nvread does by default), and PCR_Reset (the resettable PCRs 16 and 23
// of the PC Client profile). Password sessions only: no secret travels in these.
import { buildCommand, parseResponse } from './command.ts';
import { Writer } from './marshal.ts';
import { TPM_CC, TPM_RH_PLATFORM, TPM_ST_SESSIONS, writePasswordAuth } from './tpm2.ts';
import { writeNvPublic, type NvPublic } from './tpm2-structures.ts';
import type { TpmTransport } from './transport.ts';

export const TPM_CC_PCR_RESET = 0x13d;

/** TPMA_NV bits a platform-created certificate index has (as a TPM maker, or swtpm_setup,
 *  defines them): written by the platform once, readable by owner, platform and anyone
 *  with the (empty) index auth; WRITEDEFINE lets the maker lock it after the write. */
export const TPMA_NV_CERT = {
  PPWRITE: 0x1,
  WRITEDEFINE: 0x2000,
  PPREAD: 0x10000,
  OWNERREAD: 0x20000,
  AUTHREAD: 0x40000,
  NO_DA: 0x2000000,
  WRITELOCKED: 0x800,
  PLATFORMCREATE: 0x40000000,
} as const;
export const CERT_INDEX_ATTRIBUTES =
  TPMA_NV_CERT.PLATFORMCREATE | TPMA_NV_CERT.AUTHREAD | TPMA_NV_CERT.OWNERREAD | TPMA_NV_CERT.PPREAD | TPMA_NV_CERT.PPWRITE | TPMA_NV_CERT.NO_DA | TPMA_NV_CERT.WRITEDEFINE;

/** Bytes per NV_Write / NV_Read: below every TPM's TPM_PT_NV_BUFFER_MAX (libtpms: 1024+). */
export const NV_CHUNK = 768;
const TPM_CC_NV_WRITELOCK = 0x138;

function sessionCommand(cc: number, handles: number[], params: (w: Writer) => void): Uint8Array {
  return buildCommand(TPM_ST_SESSIONS, cc, (w) => {
    for (const h of handles) w.u32(h);
    writePasswordAuth(w);
    params(w);
  });
}

export function nvDefineSpacePlatform(nv: NvPublic): Uint8Array {
  const pub = new Writer(64);
  writeNvPublic(pub, nv);
  return sessionCommand(TPM_CC.NV_DefineSpace, [TPM_RH_PLATFORM], (w) => w.sized16(new Uint8Array(0)).sized16(pub.finish()));
}

export function nvWritePlatform(index: number, data: Uint8Array, offset: number): Uint8Array {
  return sessionCommand(TPM_CC.NV_Write, [TPM_RH_PLATFORM, index], (w) => w.sized16(data).u16(offset));
}

export function nvWriteLockPlatform(index: number): Uint8Array {
  return sessionCommand(TPM_CC_NV_WRITELOCK, [TPM_RH_PLATFORM, index], () => undefined);
}

/** NV_Read authorised by the index itself (empty auth; needs AUTHREAD). */
export function nvReadByIndex(index: number, size: number, offset: number): Uint8Array {
  return sessionCommand(TPM_CC.NV_Read, [index, index], (w) => w.u16(size).u16(offset));
}
export function parseNvRead(resp: Uint8Array): Uint8Array {
  const r = parseResponse(resp, '2.0').body;
  const params = r.sub(r.u32('parameterSize'), 'NV_Read parameters');
  return params.sized16('data', 4096).slice();
}

export function pcrReset(pcr: number): Uint8Array {
  return sessionCommand(TPM_CC_PCR_RESET, [pcr], () => undefined);
}

/** Check a response that carries nothing but success. */
export function parseEmpty(resp: Uint8Array): void {
  parseResponse(resp, '2.0');
}

/** Define `index` in the platform hierarchy, write `data` into it in chunks, lock it. */
export async function writePlatformCertIndex(tpm: TpmTransport, nv: Omit<NvPublic, 'dataSize'>, data: Uint8Array): Promise<void> {
  parseEmpty(await tpm.transmit(nvDefineSpacePlatform({ ...nv, dataSize: data.length })));
  for (let off = 0; off < data.length; off += NV_CHUNK) {
    parseEmpty(await tpm.transmit(nvWritePlatform(nv.index, data.subarray(off, off + NV_CHUNK), off)));
  }
  parseEmpty(await tpm.transmit(nvWriteLockPlatform(nv.index)));
}

/** Read `size` bytes of an AUTHREAD index, in chunks. */
export async function readIndex(tpm: TpmTransport, index: number, size: number): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for (let off = 0; off < size; off += NV_CHUNK) parts.push(parseNvRead(await tpm.transmit(nvReadByIndex(index, Math.min(NV_CHUNK, size - off), off))));
  return new Uint8Array(Buffer.concat(parts));
}
