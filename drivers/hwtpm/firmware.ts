// The emulated chip's platform firmware: what a real machine's firmware does before any OS
// runs, modelled so that sealing to PCRs means something with no chip. A `tis:DIR` chip's
// boot log (DIR/boot-log.cbor, CBOR {v: 1, events: [{pcr, digest, what}]}) is replayed at
// each power-on: TPM2_Startup(CLEAR), then each event extended into its SHA-256 PCR, in
// order. Changing the log (`vtpm hw measure`) is a changed firmware or boot loader: the
// PCRs that the manager's root key is sealed to then differ, as on real hardware.
import { createHash } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import { VtpmError } from '../base/errors.ts';
import { readBounded, writeFileAtomic } from '../host/state-dir.ts';
import { Tpm2Client } from '../tpm/tpm2-client.ts';
import { TPM_ALG_SHA256 } from '../tpm/tpm2.ts';
import type { HardwareTpm } from '../tpm/transport.ts';

export interface BootEvent {
  pcr: number;
  digest: Uint8Array;
  what: string;
}

const FILE = 'boot-log.cbor';
const MAX_EVENTS = 1024;

export function readBootLog(chipDir: string): BootEvent[] {
  const bytes = readBounded(join(chipDir, FILE), 1 << 20, 'the emulated firmware boot log');
  if (!bytes) return [];
  const log = decode(bytes) as { v?: unknown; events?: unknown };
  if (log?.v !== 1 || !Array.isArray(log.events) || log.events.length > MAX_EVENTS) throw new VtpmError('EINTEGRITY', `${join(chipDir, FILE)} is not a version 1 boot log`);
  return log.events.map((e: { pcr?: unknown; digest?: unknown; what?: unknown }, i: number) => {
    if (!Number.isInteger(e?.pcr) || (e.pcr as number) < 0 || (e.pcr as number) > 23 || !(e.digest instanceof Uint8Array) || e.digest.length !== 32 || typeof e.what !== 'string') {
      throw new VtpmError('EINTEGRITY', `${join(chipDir, FILE)}: event ${i} is not {pcr 0..23, 32-byte digest, what}`);
    }
    return { pcr: e.pcr as number, digest: e.digest, what: e.what };
  });
}

/** Append a measurement of `data` (SHA-256) into `pcr` to the chip's boot log. */
export function addBootEvent(chipDir: string, pcr: number, what: string): BootEvent {
  if (!Number.isInteger(pcr) || pcr < 0 || pcr > 23) throw new VtpmError('EINVAL', `PCR ${pcr} is not in 0..23`);
  const events = readBootLog(chipDir);
  if (events.length >= MAX_EVENTS) throw new VtpmError('EOVERSIZE', `the boot log already holds ${MAX_EVENTS} events`);
  const ev = { pcr, digest: new Uint8Array(createHash('sha256').update(what).digest()), what };
  mkdirSync(chipDir, { recursive: true, mode: 0o700 }); // a chip measured before its first power-on
  writeFileAtomic(join(chipDir, FILE), encode({ v: 1, events: [...events, ev] }));
  return ev;
}

/** Power-on of a chip with a boot log: Startup, then the firmware's measurements. A chip
 *  without one is left unstarted, as before (its user sends Startup). */
export async function runFirmware(tpm: HardwareTpm, chipDir: string): Promise<void> {
  const events = readBootLog(chipDir);
  if (events.length === 0) return;
  const c = new Tpm2Client(tpm);
  await c.startup();
  for (const e of events) await c.pcrExtend(e.pcr, [{ alg: TPM_ALG_SHA256, digest: e.digest }]);
}
