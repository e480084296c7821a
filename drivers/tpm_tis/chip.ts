// The TPM behind the TIS register file, injected so the register file knows nothing of
// what runs the commands. ChipThread is the one implementation: any SyncTransport (named by
// a TransportSpec) served from a worker thread.

/** `submit` returns at once; the chip runs the command elsewhere. */
export interface TisChip {
  submit(command: Uint8Array, locality: number): void;
  /** The response once the submitted command finished, else undefined; never blocks. */
  poll(): Uint8Array | undefined;
  /** Resolves when the command finished or the timeout passed (then poll() tells which). */
  whenDone(timeoutMs: number): Promise<void>;
  cancel(): void;
  close(): Promise<void>;
}
