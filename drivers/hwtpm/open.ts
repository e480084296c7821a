// The host's hardware TPM, opened from a one-word spec: the composition point above
// tpm_tis, tpm_dev and libtpms, so none of them needs to know the others.
//   tis:DIR      the emulated chip: TIS driver + register model over a libtpms TPM 2.0 in
//                a chip worker, on a private copy of libtpms (the host's chip must never
//                share libtpms' globals with a vTPM engine of the same process), NVRAM in DIR
//                (at each power-on the modelled firmware replays DIR/boot-log.cbor: firmware.ts)
//   device:PATH  a TPM character device (/dev/tpm0, /dev/tpmrm0)
import { VtpmError } from '../base/errors.ts';
import { DirStateStore } from '../host/state-dir.ts';
import { runFirmware } from './firmware.ts';
import { engineBackendSpec } from '../libtpms/engine-backend.ts';
import type { HardwareTpm, TransportSpec } from '../tpm/transport.ts';
import { TpmDevice } from '../tpm_dev/device.ts';
import type { TisDriver, TisDriverOptions } from '../tpm_tis/driver.ts';
import { openEmulatedTis, startEmulatedChip } from '../tpm_tis/emulated.ts';
import type { TisModel, TisModelOptions } from '../tpm_tis/model.ts';

export interface EmulatedTpmOptions {
  /** Directory holding the chip's NVRAM (created 0700). */
  stateDir: string;
  model?: TisModelOptions;
  driver?: TisDriverOptions;
  spinUs?: number;
}

/** The chip's TPM: powered on but not started, as a real chip comes up (firmware, here the
 *  caller, sends Startup). */
export function emulatedChipSpec(stateDir: string): TransportSpec {
  new DirStateStore(stateDir); // create and check the directory here, before the worker does
  return engineBackendSpec({ version: '2.0', stateDir, privateCopy: true, boot: false });
}

/** The emulated chip's register file alone (tests drive it register by register). */
export function startEmulatedTpmChip(opts: EmulatedTpmOptions): Promise<TisModel> {
  return startEmulatedChip({ transport: emulatedChipSpec(opts.stateDir), model: opts.model, spinUs: opts.spinUs });
}

/** The emulated chip behind the TIS driver. */
export function openEmulatedTpm(opts: EmulatedTpmOptions): Promise<TisDriver> {
  return openEmulatedTis({ ...opts, transport: emulatedChipSpec(opts.stateDir), description: `emulated TIS chip (${opts.stateDir})` });
}

export async function openHardware(spec: string): Promise<HardwareTpm> {
  if (spec.startsWith('tis:') && spec.length > 4) {
    const tpm = await openEmulatedTpm({ stateDir: spec.slice(4) });
    try {
      await runFirmware(tpm, spec.slice(4)); // the modelled platform's boot measurements
    } catch (e) {
      await tpm.close();
      throw e;
    }
    return tpm;
  }
  if (spec.startsWith('device:') && spec.length > 7) return TpmDevice.open(spec.slice(7));
  throw new VtpmError('EINVAL', `a hardware TPM is "tis:DIR" or "device:PATH", not ${JSON.stringify(spec)}`);
}
