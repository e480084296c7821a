// The swtpm control channel's wire format (swtpm include/swtpm/tpm_ioctl.h, the socket form
// that QEMU's tpm_emulator backend and `swtpm_ioctl --unix` speak): every integer is
// big-endian; a request is u32 command + the `req` half of the command's struct, a response
// is the `resp` half (most begin with the u32 result). This file knows the layouts and the
// framing rules only; controller.ts decides what a command does.
import { VtpmError } from '../base/errors.ts';
import type { StateBlobType } from '../tpm/engine.ts';
import { Reader, Writer } from '../tpm/marshal.ts';

export const CMD = {
  GET_CAPABILITY: 0x01,
  INIT: 0x02,
  SHUTDOWN: 0x03,
  GET_TPMESTABLISHED: 0x04,
  SET_LOCALITY: 0x05,
  HASH_START: 0x06,
  HASH_DATA: 0x07,
  HASH_END: 0x08,
  CANCEL_TPM_CMD: 0x09,
  STORE_VOLATILE: 0x0a,
  RESET_TPMESTABLISHED: 0x0b,
  GET_STATEBLOB: 0x0c,
  SET_STATEBLOB: 0x0d,
  STOP: 0x0e,
  GET_CONFIG: 0x0f,
  SET_DATAFD: 0x10,
  SET_BUFFERSIZE: 0x11,
  GET_INFO: 0x12,
  LOCK_STORAGE: 0x13,
} as const;
export type CtrlCommand = (typeof CMD)[keyof typeof CMD];

export function cmdName(cmd: number): string {
  return Object.entries(CMD).find(([, v]) => v === cmd)?.[0] ?? `0x${cmd.toString(16).padStart(8, '0')}`;
}

/** swtpm's result codes (TPM 1.2 codes from libtpms' tpm_error.h). */
export const RES = {
  SUCCESS: 0,
  BAD_PARAMETER: 0x03,
  FAIL: 0x09,
  BAD_ORDINAL: 0x0a,
  SIZE: 0x17,
  IOERROR: 0x1f,
  BAD_LOCALITY: 0x3d,
  /** Non-fatal (0x800 bit): e.g. a state blob that does not exist. */
  RETRY: 0x800,
} as const;

/** PTM_CAP_* bits of GET_CAPABILITY. */
export const CAP = {
  INIT: 1 << 0,
  SHUTDOWN: 1 << 1,
  GET_TPMESTABLISHED: 1 << 2,
  SET_LOCALITY: 1 << 3,
  HASHING: 1 << 4,
  CANCEL_TPM_CMD: 1 << 5,
  STORE_VOLATILE: 1 << 6,
  RESET_TPMESTABLISHED: 1 << 7,
  GET_STATEBLOB: 1 << 8,
  SET_STATEBLOB: 1 << 9,
  STOP: 1 << 10,
  GET_CONFIG: 1 << 11,
  SET_DATAFD: 1 << 12,
  SET_BUFFERSIZE: 1 << 13,
  GET_INFO: 1 << 14,
  SEND_COMMAND_HEADER: 1 << 15,
  LOCK_STORAGE: 1 << 16,
} as const;

/** What this implementation offers: all of swtpm's (the TCG command header only for TPM 2.0). */
export function capabilities(version: '1.2' | '2.0'): number {
  let caps = 0;
  for (const [k, v] of Object.entries(CAP)) if (k !== 'SEND_COMMAND_HEADER') caps |= v;
  if (version === '2.0') caps |= CAP.SEND_COMMAND_HEADER;
  return caps >>> 0;
}

export const PTM_INIT_FLAG_DELETE_VOLATILE = 1;
export const PTM_STATE_FLAG_DECRYPTED = 1;
export const PTM_STATE_FLAG_ENCRYPTED = 2;
export const PTM_CONFIG_FLAG_FILE_KEY = 1;
export const PTM_CONFIG_FLAG_MIGRATION_KEY = 2;

export const BLOB_TYPE: Record<number, StateBlobType> = { 1: 'permanent', 2: 'volatile', 3: 'savestate' };
export const BLOB_CODE: Record<StateBlobType, number> = { permanent: 1, volatile: 2, savestate: 3 };
/** libtpms' NVRAM names of the blobs (tpm_nvfilename.h), as the StateStore holds them. */
export const BLOB_NAME: Record<StateBlobType, string> = { permanent: 'permall', volatile: 'volatilestate', savestate: 'savestate' };

// ---- framing limits ----

/** swtpm's receive buffer: u32 command + sizeof(ptm_hdata) (u32 length + 4096 data). The
 *  first read of a frame takes at most this much, as swtpm's does. */
export const CTRL_FIRST_READ = 4 + 4 + 4096;
/** Largest state blob SET_STATEBLOB takes (swtpm: "Unreasonable large state", TPM_FAIL). */
export const STATE_BLOB_MAX = 512 * 1024;
/** Largest HASH_DATA payload in one frame (ptm_hdata's buffer; QEMU and swtpm_ioctl send
 *  at most this); beyond it the frame is refused with TPM_BAD_PARAMETER. */
export const HASH_DATA_MAX = 4096;
/** The most a TPM command or response may be on the data channel (libtpms' buffer). */
export const TPM_BUFFER_MAX = 4096;

/** Fixed request sizes after the u32 command (the `req` structs); 0 for commands without. */
const REQ_FIXED: Partial<Record<number, number>> = {
  [CMD.INIT]: 4,
  [CMD.SET_LOCALITY]: 1,
  [CMD.RESET_TPMESTABLISHED]: 1,
  [CMD.GET_STATEBLOB]: 12,
  [CMD.SET_BUFFERSIZE]: 4,
  [CMD.GET_INFO]: 16,
  [CMD.LOCK_STORAGE]: 4,
  [CMD.HASH_DATA]: 4, // then `length` bytes
  [CMD.SET_STATEBLOB]: 12, // then `length` bytes
};

export type FrameNeed =
  /** The frame is `bytes` long (at least; for fixed commands extra bytes already read stay in it). */
  | { ok: true; bytes: number }
  /** The frame can never be accepted: answer `result` and drop the rest of the input. */
  | { ok: false; result: number; why: string };

/** How long the frame starting with `head` is, from what has arrived so far: less than 4
 *  bytes, or a variable command whose length field has not arrived, asks for the bytes
 *  that would tell. */
export function frameNeed(head: Uint8Array): FrameNeed {
  if (head.length < 4) return { ok: true, bytes: 4 };
  const r = new Reader(head);
  const cmd = r.u32();
  const fixed = REQ_FIXED[cmd] ?? 0;
  if (cmd !== CMD.HASH_DATA && cmd !== CMD.SET_STATEBLOB) return { ok: true, bytes: 4 + fixed };
  if (head.length < 4 + fixed) return { ok: true, bytes: 4 + fixed };
  r.skip(fixed - 4);
  const length = r.u32();
  if (cmd === CMD.HASH_DATA && length > HASH_DATA_MAX) {
    return { ok: false, result: RES.BAD_PARAMETER, why: `HASH_DATA of ${length} bytes exceeds ${HASH_DATA_MAX}` };
  }
  if (cmd === CMD.SET_STATEBLOB && length > STATE_BLOB_MAX) {
    return { ok: false, result: RES.FAIL, why: `state blob of ${length} bytes exceeds ${STATE_BLOB_MAX}` };
  }
  return { ok: true, bytes: 4 + fixed + length };
}

// ---- requests ----

export type CtrlRequest =
  | {
      cmd:
        | typeof CMD.GET_CAPABILITY
        | typeof CMD.SHUTDOWN
        | typeof CMD.GET_TPMESTABLISHED
        | typeof CMD.HASH_START
        | typeof CMD.HASH_END
        | typeof CMD.CANCEL_TPM_CMD
        | typeof CMD.STORE_VOLATILE
        | typeof CMD.STOP
        | typeof CMD.GET_CONFIG
        | typeof CMD.SET_DATAFD;
    }
  | { cmd: typeof CMD.INIT; flags: number }
  | { cmd: typeof CMD.SET_LOCALITY; locality: number }
  | { cmd: typeof CMD.RESET_TPMESTABLISHED; locality: number }
  | { cmd: typeof CMD.HASH_DATA; data: Uint8Array }
  | { cmd: typeof CMD.GET_STATEBLOB; flags: number; type: number; offset: number }
  | { cmd: typeof CMD.SET_STATEBLOB; flags: number; type: number; data: Uint8Array }
  | { cmd: typeof CMD.SET_BUFFERSIZE; size: number }
  | { cmd: typeof CMD.GET_INFO; flags: bigint; offset: number }
  | { cmd: typeof CMD.LOCK_STORAGE; retries: number };

export type Parsed =
  | { ok: true; req: CtrlRequest }
  /** `cmd` is what the frame named (for the running checks that come first in swtpm). */
  | { ok: false; cmd: number; result: number; why: string };

/** Which commands need a running TPM (swtpm answers TPM_BAD_ORDINAL otherwise, before it
 *  looks at the payload), and which need a stopped one. */
export const NEEDS_RUNNING = new Set<number>([
  CMD.GET_TPMESTABLISHED,
  CMD.RESET_TPMESTABLISHED,
  CMD.HASH_START,
  CMD.HASH_DATA,
  CMD.HASH_END,
  CMD.CANCEL_TPM_CMD,
  CMD.STORE_VOLATILE,
  CMD.GET_STATEBLOB,
]);
export const NEEDS_STOPPED = new Set<number>([CMD.SET_STATEBLOB]);

/** Parse one whole frame with swtpm's payload checks: commands without a request must come
 *  alone ("n != 0"), INIT exactly with its 4 bytes, the others with at least their struct;
 *  HASH_DATA / SET_STATEBLOB carry exactly their declared length. */
export function parseRequest(frame: Uint8Array): Parsed {
  if (frame.length < 4) return { ok: false, cmd: -1, result: RES.BAD_PARAMETER, why: `frame of ${frame.length} bytes has no command` };
  const r = new Reader(frame);
  const cmd = r.u32();
  const n = r.remaining;
  const bad = (why: string): Parsed => ({ ok: false, cmd, result: RES.BAD_PARAMETER, why: `${cmdName(cmd)}: ${why}` });
  const atLeast = (k: number) => n >= k;
  switch (cmd) {
    case CMD.GET_CAPABILITY:
    case CMD.SET_DATAFD:
      return { ok: true, req: { cmd } }; // swtpm ignores any payload of these
    case CMD.SHUTDOWN:
    case CMD.GET_TPMESTABLISHED:
    case CMD.HASH_START:
    case CMD.HASH_END:
    case CMD.CANCEL_TPM_CMD:
    case CMD.STORE_VOLATILE:
    case CMD.STOP:
    case CMD.GET_CONFIG:
      return n === 0 ? { ok: true, req: { cmd } } : bad(`takes no payload, got ${n} bytes`);
    case CMD.INIT:
      return n === 4 ? { ok: true, req: { cmd, flags: r.u32() } } : bad(`needs exactly 4 bytes, got ${n}`);
    case CMD.SET_LOCALITY:
    case CMD.RESET_TPMESTABLISHED:
      return atLeast(1) ? { ok: true, req: { cmd, locality: r.u8() } } : bad('needs the locality byte');
    case CMD.HASH_DATA: {
      if (!atLeast(4)) return bad('needs the length');
      const length = r.u32();
      if (length > HASH_DATA_MAX) return bad(`length ${length} exceeds ${HASH_DATA_MAX}`);
      if (r.remaining !== length) return bad(`declares ${length} bytes, carries ${r.remaining}`);
      return { ok: true, req: { cmd, data: r.bytes(length) } };
    }
    case CMD.GET_STATEBLOB:
      if (!atLeast(12)) return bad(`needs 12 bytes, got ${n}`);
      return { ok: true, req: { cmd, flags: r.u32(), type: r.u32(), offset: r.u32() } };
    case CMD.SET_STATEBLOB: {
      if (!atLeast(12)) return bad(`needs 12 bytes, got ${n}`);
      const flags = r.u32();
      const type = r.u32();
      const length = r.u32();
      if (length > STATE_BLOB_MAX) return { ok: false, cmd, result: RES.FAIL, why: `state blob of ${length} bytes exceeds ${STATE_BLOB_MAX}` };
      if (r.remaining !== length) return bad(`declares ${length} bytes, carries ${r.remaining}`);
      return { ok: true, req: { cmd, flags, type, data: r.bytes(length) } };
    }
    case CMD.SET_BUFFERSIZE:
      return atLeast(4) ? { ok: true, req: { cmd, size: r.u32() } } : bad(`needs 4 bytes, got ${n}`);
    case CMD.GET_INFO:
      if (!atLeast(16)) return bad(`needs 16 bytes, got ${n}`);
      return { ok: true, req: { cmd, flags: r.u64(), offset: r.u32() } };
    case CMD.LOCK_STORAGE:
      return atLeast(4) ? { ok: true, req: { cmd, retries: r.u32() } } : bad(`needs 4 bytes, got ${n}`);
    default:
      return { ok: false, cmd, result: RES.BAD_ORDINAL, why: `unknown command ${cmdName(cmd)}` };
  }
}

// ---- responses ----

/** The bare result (ptm_res): most commands' whole response. */
export function resultResponse(result: number): Uint8Array {
  return new Writer(4).u32(result).finish();
}

/** ptm_cap_n: result 0, then the capability bits (QEMU reads the 8 bytes as one u64). */
export function capabilityResponse(caps: number): Uint8Array {
  return new Writer(8).u32(RES.SUCCESS).u32(caps).finish();
}

/** ptm_est: result, the established bit, 3 pad bytes. */
export function establishedResponse(result: number, bit: boolean): Uint8Array {
  return new Writer(8).u32(result).u8(bit ? 1 : 0).u8(0).u8(0).u8(0).finish();
}

/** ptm_getstate's resp: result, flags, totlength, length, then the bytes from `offset` on.
 *  Like swtpm, everything from the offset comes in this one response (totlength = length). */
export function stateBlobResponse(result: number, flags: number, blob: Uint8Array | undefined, offset: number): Uint8Array {
  const rest = result === RES.SUCCESS && blob && offset < blob.length ? blob.subarray(offset) : new Uint8Array(0);
  return new Writer(16 + rest.length).u32(result).u32(flags).u32(rest.length).u32(rest.length).bytes(rest).finish();
}

/** ptm_getconfig's resp. */
export function configResponse(flags: number): Uint8Array {
  return new Writer(8).u32(RES.SUCCESS).u32(flags).finish();
}

/** ptm_setbuffersize's resp. */
export function bufferSizeResponse(size: number, min: number, max: number): Uint8Array {
  return new Writer(16).u32(RES.SUCCESS).u32(size).u32(min).u32(max).finish();
}

/** The most of the info string one GET_INFO response carries (PTM_GETINFO_SIZE). */
export const GETINFO_SIZE = 3 * 1024;

/** ptm_getinfo's resp for the string `info` (sent NUL-terminated, as swtpm does), from
 *  `offset`; undefined when the offset is beyond the string (swtpm: TPM_BAD_PARAMETER). */
export function infoResponse(info: string, offset: number): Uint8Array | undefined {
  const s = Buffer.from(info + '\0', 'utf8');
  if (offset >= s.length - 1) return undefined;
  const part = s.subarray(offset, offset + Math.min(s.length - offset, GETINFO_SIZE));
  return new Writer(12 + part.length).u32(RES.SUCCESS).u32(s.length).u32(part.length).bytes(part).finish();
}

// ---- requests as a client builds them (tests, a manager's own client) ----

/** u32 command + payload built by `body`. */
export function buildRequest(cmd: number, body?: (w: Writer) => void): Uint8Array {
  const w = new Writer(16).u32(cmd);
  body?.(w);
  return w.finish();
}

/** The u32 result at the head of a response. */
export function resultOf(resp: Uint8Array): number {
  if (resp.length < 4) throw new VtpmError('ETRUNC', `control response of ${resp.length} bytes has no result`);
  return new Reader(resp).u32('result');
}
