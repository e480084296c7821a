// How a vtpmd's exit tells the manager what happened to its TPM (vtpmd/main.ts).

/** Stopped or suspended as asked: every piece of state reached the manager. */
export const EXIT_OK = 0;
/** A suspend (SIGUSR1) could not store the running TPM's state: vtpmd stopped orderly instead. */
export const SUSPEND_FAILED = 3;
