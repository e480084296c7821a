// How long a command may run before its transport gives up on the TPM: Linux's
// tpm2_ordinal_duration_index / tpm1 ordinal durations, reduced to three classes. Every
// transport takes its deadline from here (or from its caller), not from its own table.
import { parseHeader, TPM_ST_NO_SESSIONS } from './command.ts';
import { TPM_ORD } from './tpm12.ts';
import { TPM_CC, TPM_ST_SESSIONS } from './tpm2.ts';

/** Linux's TPM2 default duration, also the bound for a transport that does not ask per command. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 120_000;
const LONG_LONG_MS = 300_000;
const SHORT_MS = 750;

// Key generation gets the long-long duration; cheap reads the short one.
const TPM2_LONG_LONG = new Set<number>([TPM_CC.CreatePrimary, TPM_CC.Create]);
const TPM2_SHORT = new Set<number>([TPM_CC.PCR_Read, TPM_CC.GetCapability, TPM_CC.ReadPublic]);
const TPM12_LONG_LONG = new Set<number>([TPM_ORD.TakeOwnership, TPM_ORD.CreateWrapKey, TPM_ORD.MakeIdentity, TPM_ORD.CreateEndorsementKeyPair]);

/** Duration (ms) allowed for a command, by its tag (family) and command code. */
export function commandDurationMs(tag: number, code: number): number {
  const tpm2 = tag === TPM_ST_NO_SESSIONS || tag === TPM_ST_SESSIONS;
  if (tpm2 ? TPM2_LONG_LONG.has(code) : TPM12_LONG_LONG.has(code)) return LONG_LONG_MS;
  if (tpm2 && TPM2_SHORT.has(code)) return SHORT_MS;
  return DEFAULT_COMMAND_TIMEOUT_MS;
}

/** The duration of a command, from its header alone (a size field that lies is the TPM's
 *  to answer, not the transport's). */
export function commandTimeoutMs(command: Uint8Array): number {
  const h = parseHeader(command, 'command', { whole: false });
  return commandDurationMs(h.tag, h.code);
}
