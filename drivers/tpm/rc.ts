// TPM response codes with names, for both families, so errors say what the TPM said.

const TPM2_FMT0: Record<number, string> = {
  0x000: 'TPM_RC_SUCCESS',
  0x01e: 'TPM_RC_BAD_TAG',
  0x100: 'TPM_RC_INITIALIZE',
  0x101: 'TPM_RC_FAILURE',
  0x103: 'TPM_RC_SEQUENCE',
  0x10b: 'TPM_RC_PRIVATE',
  0x119: 'TPM_RC_HMAC',
  0x120: 'TPM_RC_DISABLED',
  0x121: 'TPM_RC_EXCLUSIVE',
  0x124: 'TPM_RC_AUTH_TYPE',
  0x125: 'TPM_RC_AUTH_MISSING',
  0x126: 'TPM_RC_POLICY',
  0x127: 'TPM_RC_PCR',
  0x128: 'TPM_RC_PCR_CHANGED',
  0x12d: 'TPM_RC_UPGRADE',
  0x12e: 'TPM_RC_TOO_MANY_CONTEXTS',
  0x12f: 'TPM_RC_AUTH_UNAVAILABLE',
  0x130: 'TPM_RC_REBOOT',
  0x131: 'TPM_RC_UNBALANCED',
  0x142: 'TPM_RC_COMMAND_SIZE',
  0x143: 'TPM_RC_COMMAND_CODE',
  0x144: 'TPM_RC_AUTHSIZE',
  0x145: 'TPM_RC_AUTH_CONTEXT',
  0x146: 'TPM_RC_NV_RANGE',
  0x147: 'TPM_RC_NV_SIZE',
  0x148: 'TPM_RC_NV_LOCKED',
  0x149: 'TPM_RC_NV_AUTHORIZATION',
  0x14a: 'TPM_RC_NV_UNINITIALIZED',
  0x14b: 'TPM_RC_NV_SPACE',
  0x14c: 'TPM_RC_NV_DEFINED',
  0x150: 'TPM_RC_BAD_CONTEXT',
  0x151: 'TPM_RC_CPHASH',
  0x152: 'TPM_RC_PARENT',
  0x153: 'TPM_RC_NEEDS_TEST',
  0x154: 'TPM_RC_NO_RESULT',
  0x155: 'TPM_RC_SENSITIVE',
};
const TPM2_FMT1: Record<number, string> = {
  0x001: 'TPM_RC_ASYMMETRIC',
  0x002: 'TPM_RC_ATTRIBUTES',
  0x003: 'TPM_RC_HASH',
  0x004: 'TPM_RC_VALUE',
  0x005: 'TPM_RC_HIERARCHY',
  0x007: 'TPM_RC_KEY_SIZE',
  0x008: 'TPM_RC_MGF',
  0x009: 'TPM_RC_MODE',
  0x00a: 'TPM_RC_TYPE',
  0x00b: 'TPM_RC_HANDLE',
  0x00c: 'TPM_RC_KDF',
  0x00d: 'TPM_RC_RANGE',
  0x00e: 'TPM_RC_AUTH_FAIL',
  0x00f: 'TPM_RC_NONCE',
  0x010: 'TPM_RC_PP',
  0x012: 'TPM_RC_SCHEME',
  0x015: 'TPM_RC_SIZE',
  0x016: 'TPM_RC_SYMMETRIC',
  0x017: 'TPM_RC_TAG',
  0x018: 'TPM_RC_SELECTOR',
  0x01a: 'TPM_RC_INSUFFICIENT',
  0x01b: 'TPM_RC_SIGNATURE',
  0x01c: 'TPM_RC_KEY',
  0x01d: 'TPM_RC_POLICY_FAIL',
  0x01f: 'TPM_RC_INTEGRITY',
  0x020: 'TPM_RC_TICKET',
  0x021: 'TPM_RC_RESERVED_BITS',
  0x022: 'TPM_RC_BAD_AUTH',
  0x023: 'TPM_RC_EXPIRED',
  0x024: 'TPM_RC_POLICY_CC',
  0x025: 'TPM_RC_BINDING',
  0x026: 'TPM_RC_CURVE',
  0x027: 'TPM_RC_ECC_POINT',
};
const TPM2_WARN: Record<number, string> = {
  0x901: 'TPM_RC_CONTEXT_GAP',
  0x902: 'TPM_RC_OBJECT_MEMORY',
  0x903: 'TPM_RC_SESSION_MEMORY',
  0x904: 'TPM_RC_MEMORY',
  0x905: 'TPM_RC_SESSION_HANDLES',
  0x906: 'TPM_RC_OBJECT_HANDLES',
  0x907: 'TPM_RC_LOCALITY',
  0x908: 'TPM_RC_YIELDED',
  0x909: 'TPM_RC_CANCELED',
  0x90a: 'TPM_RC_TESTING',
  0x920: 'TPM_RC_NV_RATE',
  0x921: 'TPM_RC_LOCKOUT',
  0x922: 'TPM_RC_RETRY',
  0x923: 'TPM_RC_NV_UNAVAILABLE',
};
const TPM12: Record<number, string> = {
  0: 'TPM_SUCCESS',
  1: 'TPM_AUTHFAIL',
  2: 'TPM_BADINDEX',
  3: 'TPM_BAD_PARAMETER',
  4: 'TPM_AUDITFAILURE',
  5: 'TPM_CLEAR_DISABLED',
  6: 'TPM_DEACTIVATED',
  7: 'TPM_DISABLED',
  8: 'TPM_DISABLED_CMD',
  9: 'TPM_FAIL',
  10: 'TPM_BAD_ORDINAL',
  11: 'TPM_INSTALL_DISABLED',
  12: 'TPM_INVALID_KEYHANDLE',
  13: 'TPM_KEYNOTFOUND',
  14: 'TPM_INAPPROPRIATE_ENC',
  15: 'TPM_MIGRATEFAIL',
  16: 'TPM_INVALID_PCR_INFO',
  17: 'TPM_NOSPACE',
  18: 'TPM_NOSRK',
  19: 'TPM_NOTSEALED_BLOB',
  20: 'TPM_OWNER_SET',
  21: 'TPM_RESOURCES',
  22: 'TPM_SHORTRANDOM',
  23: 'TPM_SIZE',
  24: 'TPM_WRONGPCRVAL',
  25: 'TPM_BAD_PARAM_SIZE',
  26: 'TPM_SHA_THREAD',
  27: 'TPM_SHA_ERROR',
  28: 'TPM_FAILEDSELFTEST',
  29: 'TPM_AUTH2FAIL',
  30: 'TPM_BADTAG',
  31: 'TPM_IOERROR',
  32: 'TPM_ENCRYPT_ERROR',
  33: 'TPM_DECRYPT_ERROR',
  34: 'TPM_INVALID_AUTHHANDLE',
  35: 'TPM_NO_ENDORSEMENT',
  36: 'TPM_INVALID_KEYUSAGE',
  37: 'TPM_WRONG_ENTITYTYPE',
  38: 'TPM_INVALID_POSTINIT',
  39: 'TPM_INAPPROPRIATE_SIG',
  59: 'TPM_BADCONTEXT',
  0x800: 'TPM_RETRY',
};

export const TPM_RC_SUCCESS = 0;
export const TPM_RC_INITIALIZE = 0x100;
export const TPM_RC_FAILURE = 0x101;
export const TPM_RC_COMMAND_SIZE = 0x142;
export const TPM_FAIL = 9;
export const TPM_BAD_PARAM_SIZE = 25;

/** Human-readable name of a TPM 2.0 response code, with handle/session/parameter number. */
export function tpm2RcName(rc: number): string {
  if (rc === 0) return 'TPM_RC_SUCCESS';
  if (rc & 0x80) {
    // Format one: error number in bits 0-5, parameter/handle/session in bits 6 and 8-11.
    const base = TPM2_FMT1[rc & 0x3f] ?? `TPM_RC_FMT1_0x${(rc & 0x3f).toString(16)}`;
    const n = (rc >> 8) & 0xf;
    if (rc & 0x40) return `${base} (parameter ${n})`;
    if (n & 0x8) return `${base} (session ${n & 0x7})`;
    return n ? `${base} (handle ${n})` : base;
  }
  if ((rc & 0x900) === 0x900) return TPM2_WARN[rc & 0x97f] ?? `TPM_RC_WARN_0x${rc.toString(16)}`;
  if (rc & 0x100) return TPM2_FMT0[rc & 0x17f] ?? `TPM_RC_VER1_0x${rc.toString(16)}`;
  // TPM 1.2 codes can appear in TPM 2.0 responses for 1.2-tagged commands.
  return TPM12[rc] ?? `TPM_RC_0x${rc.toString(16)}`;
}

export function tpm12RcName(rc: number): string {
  return TPM12[rc] ?? `TPM_RC_0x${rc.toString(16)}`;
}

export function rcName(rc: number, family: '1.2' | '2.0'): string {
  return family === '2.0' ? tpm2RcName(rc) : tpm12RcName(rc);
}
