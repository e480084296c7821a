// The numbers the resource manager shares with Linux' tpm2-space.c and the TPM 2.0 spec
// (Part 2), gathered in one place. Where the kernel chose a value (table sizes, backing
// store size, the synthesized response code) the kernel's value is used so a TSS sees the
// same thing through our tpmrm0 as through a Linux one.

/** Handle types (the top byte of a handle), TPM_HT_* << 24. */
export const HT_MASK = 0xff000000;
export const HT_TRANSIENT = 0x80000000;
export const HT_HMAC_SESSION = 0x02000000;
export const HT_POLICY_SESSION = 0x03000000;

/** Slots per space: the kernel's context_tbl and session_tbl both have 3 entries. */
export const SPACE_OBJECTS = 3;
export const SPACE_SESSIONS = 3;
/** Bytes of saved contexts a space keeps per kind (objects, sessions): the kernel's
 *  TPM2_SPACE_BUFFER_SIZE (16 KiB since Linux 5.10; a page before). */
export const SPACE_BUFFER_SIZE = 16384;

/** A context-table entry whose object is saved (not loaded): the kernel's ~0. */
export const SAVED = 0xffffffff;

/** Virtual handle of slot i, as the kernel numbers them: 0x80ffffff, 0x80fffffe, ... */
export function virtualHandle(slot: number): number {
  return (HT_TRANSIENT | (0xffffff - slot)) >>> 0;
}
/** Slot a virtual transient handle names (may be out of range: callers check). */
export function slotOf(vhandle: number): number {
  return 0xffffff - (vhandle & 0xffffff);
}

/** TPMA_CC fields (Part 2 §8.9). */
export const CC_INDEX_MASK = 0xffff;
export const CC_CHANDLES_SHIFT = 25;
export const CC_CHANDLES_MASK = 0x7;
export const CC_RHANDLE_BIT = 1 << 28;

export const TPM_CAP_COMMANDS = 2;
export const TPM_CC_FIRST = 0x11f;
export const TPM_CC_CONTEXT_LOAD = 0x161;
export const TPM_CC_CONTEXT_SAVE = 0x162;
export const TPM_CC_FLUSH_CONTEXT = 0x165;
export const TPM_CC_GET_CAPABILITY = 0x17a;

/** Response codes the kernel tells apart when it loads and saves contexts. */
export const TPM_RC_HANDLE = 0x08b;
export const TPM_RC_INTEGRITY = 0x09f;
export const TPM_RC_REFERENCE_H0 = 0x910;
export const TPM_RC_COMMAND_CODE = 0x143;
/** tpm2-tss' layer for errors a resource manager makes up in the TPM's place (11 << 16). */
export const TSS2_RESMGR_TPM_RC_LAYER = 11 << 16;

/** The kernel's tpm2_rc_value: a format-one code without its handle/parameter number. */
export function rcValue(rc: number): number {
  return rc & 0x80 ? rc & 0xbf : rc;
}

/** errno values the kernel's space code returns (the write, or the async read, fails with them). */
export const ERRNO = { ENOENT: 2, EIO: 5, ENOMEM: 12, EFAULT: 14, EINVAL: 22 } as const;
