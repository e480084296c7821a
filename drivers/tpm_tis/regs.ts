// TIS / PTP FIFO register map (TCG PC Client Platform TPM Profile, FIFO interface):
// offsets within one locality's 4 KiB window, bit names as the spec and Linux name them.

export const TIS_BASE = 0xfed40000;
export const LOCALITY_STRIDE = 0x1000;
export const LOCALITIES = 5;

export const REG = {
  ACCESS: 0x00,
  INT_ENABLE: 0x08,
  INT_VECTOR: 0x0c,
  INT_STATUS: 0x10,
  INTF_CAPABILITY: 0x14,
  STS: 0x18,
  DATA_FIFO: 0x24,
  INTERFACE_ID: 0x30,
  XDATA_FIFO: 0x80,
  DID_VID: 0xf00,
  RID: 0xf04,
} as const;

/** Width in bytes of each register, so sub-register accesses (STS+1 for burstCount) work. */
export const REG_WIDTH: Record<number, number> = {
  [REG.ACCESS]: 1,
  [REG.INT_ENABLE]: 4,
  [REG.INT_VECTOR]: 1,
  [REG.INT_STATUS]: 4,
  [REG.INTF_CAPABILITY]: 4,
  [REG.STS]: 4,
  [REG.DATA_FIFO]: 4,
  [REG.INTERFACE_ID]: 4,
  [REG.XDATA_FIFO]: 4,
  [REG.DID_VID]: 4,
  [REG.RID]: 1,
};

export const ACCESS = {
  tpmEstablishment: 0x01, // reads 1 while no dynamic OS was established (active low)
  requestUse: 0x02,
  pendingRequest: 0x04,
  seize: 0x08,
  beenSeized: 0x10,
  activeLocality: 0x20,
  tpmRegValidSts: 0x80,
} as const;

export const STS = {
  responseRetry: 0x02,
  selfTestDone: 0x04,
  expect: 0x08,
  dataAvail: 0x10,
  tpmGo: 0x20,
  commandReady: 0x40,
  stsValid: 0x80,
  commandCancel: 1 << 24,
  resetEstablishment: 1 << 25,
  familyShift: 26,
  familyTpm2: 1,
  burstShift: 8,
  burstMask: 0xffff,
} as const;

/** INT_ENABLE / INT_STATUS bits. */
export const INT = {
  dataAvail: 0x01,
  stsValid: 0x02,
  localityChange: 0x04,
  commandReady: 0x80,
  all: 0x87,
  globalEnable: 0x80000000,
} as const;

/** INTF_CAPABILITY: the four interrupts, low level, dynamic burst count, 64-byte transfers,
 *  interface version 1.3 for TPM 2.0 (the value QEMU's TIS model advertises too). */
export const INTF_CAPABILITY_VALUE = (INT.all | 0x10 | (3 << 9) | (3 << 28)) >>> 0;

/** INTERFACE_ID: FIFO interface for TPM 2.0, five localities, FIFO supported, selector locked. */
export const INTERFACE_ID_VALUE = ((1 << 8) | (1 << 13) | (1 << 19)) >>> 0;

/** Vendor 0x1014 (IBM, whose TPM reference code libtpms is), device 0x0001, as QEMU uses. */
export const DID_VID_VALUE = 0x00011014;
export const RID_VALUE = 0x01;

/** The buffer a command or response may fill (Linux tpm-dev and tpmif use 4096 as well). */
export const TIS_BUFFER_SIZE = 4096;

/** Spec timeouts (PTP "TIMEOUT_A..D"), in milliseconds, as Linux's tpm_tis uses them. */
export const TIMEOUT = { A: 750, B: 2000, C: 200, D: 30 } as const;

// Offset → register base, precomputed once: the lookup sits on every register access.
const REGISTER_AT = new Int16Array(LOCALITY_STRIDE).fill(-1);
for (const base of Object.values(REG)) for (let i = 0; i < REG_WIDTH[base]!; i++) REGISTER_AT[base + i] = base;

/** The register a byte offset within a locality window belongs to (base offset), or -1. */
export function registerAt(offset: number): number {
  return REGISTER_AT[offset] ?? -1;
}
