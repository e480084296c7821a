// An emulated TIS chip put together: the register file over a chip thread that serves the
// TPM a TransportSpec names, and the TIS driver over that register file. Which TPM runs
// behind it is the caller's choice (drivers/hwtpm picks a libtpms engine), so tpm_tis
// knows nothing of libtpms.
import type { TransportSpec } from '../tpm/transport.ts';
import { ChipThread } from './chip-thread.ts';
import { TisDriver, type TisDriverOptions } from './driver.ts';
import { TisModel, type TisModelOptions } from './model.ts';

export interface EmulatedChipOptions {
  /** The TPM behind the registers, built in the chip worker. */
  transport: TransportSpec;
  model?: TisModelOptions;
  /** How long the chip worker spins for the next command before sleeping (µs). */
  spinUs?: number;
}

export interface EmulatedTisOptions extends EmulatedChipOptions {
  driver?: TisDriverOptions;
  /** What the driver says it is (HardwareTpm.description). */
  description: string;
}

/** Start the chip behind the register file. Close with `model.close()`. */
export async function startEmulatedChip(opts: EmulatedChipOptions): Promise<TisModel> {
  const chip = await ChipThread.start({ transport: opts.transport, spinUs: opts.spinUs });
  return new TisModel(chip, opts.model);
}

/** The emulated chip as a HardwareTpm: TIS driver over the model over the chip. */
export async function openEmulatedTis(opts: EmulatedTisOptions): Promise<TisDriver> {
  const model = await startEmulatedChip(opts);
  return new TisDriver(model, { irq: model.irq, ...opts.driver, description: opts.description, onClose: () => model.close() });
}
