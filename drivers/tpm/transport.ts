// The seams of the stack, in the manner of Linux's tpm_class_ops and tpm2-tss' TCTI.

/** Anything that takes one whole TPM command and gives back one whole response:
 *  the in-process engine, the FUSE node, the tpmif shared page, the TIS driver, a device. */
export interface TpmTransport {
  /** Send one command; resolves with the whole response. Failures below the TPM reject
   *  with a VtpmError (callers at the guest edge turn that into TPM_FAIL or EIO). */
  transmit(command: Uint8Array, locality?: number): Promise<Uint8Array>;
  /** Ask the TPM to abandon the command in flight, if any (best effort). */
  cancel?(): Promise<void>;
  close(): Promise<void>;
}

/** The host's hardware TPM as the manager sees it (TIS model or a real device). */
export interface HardwareTpm extends TpmTransport {
  readonly description: string;
}
