// The composition point of the emulated hardware TPM: TIS register model + a libtpms TPM 2.0
// engine (in a worker) whose NVRAM is a directory in the host's state dir. It is the one
// file of drivers/tpm_tis that reaches up into vtpmd/, so the model and driver stay free
// of libtpms and this wiring can be replaced by a real chip without touching them.
import type { Engine } from '../tpm/engine.ts';
import { TisDriver, type TisDriverOptions } from './driver.ts';
import { TisModel, type TisModelOptions } from './model.ts';
import { DirStateStore } from '../host/state-dir.ts';
import { ChipThread } from './chip-thread.ts';

export interface EmulatedTpmOptions {
  /** Directory holding the chip's NVRAM (created 0700). */
  stateDir: string;
  model?: TisModelOptions;
  driver?: TisDriverOptions;
  spinUs?: number;
}

/** Runs in the chip worker: the engine and its directory store. */
export async function createChipEngine(args: { stateDir: string }): Promise<Engine> {
  const { LibtpmsEngine } = await import('../libtpms/libtpms-engine.ts');
  // A private copy of libtpms: the host's chip must never share libtpms' globals with a
  // vTPM engine that the same process may run (manager, tests, benchmarks).
  return new LibtpmsEngine({ version: '2.0', store: new DirStateStore(args.stateDir), privateCopy: true });
}

/** Start the emulated chip behind the register file. Close with `model.close()`. */
export async function startEmulatedChip(opts: EmulatedTpmOptions): Promise<TisModel> {
  new DirStateStore(opts.stateDir); // create and check the directory before the worker does
  const chip = await ChipThread.start({
    module: import.meta.url,
    exportName: 'createChipEngine',
    args: { stateDir: opts.stateDir },
    spinUs: opts.spinUs,
  });
  return new TisModel(chip, opts.model);
}

/** The emulated hardware TPM as a HardwareTpm: TIS driver over the model over the chip. */
export async function openEmulatedTpm(opts: EmulatedTpmOptions): Promise<TisDriver> {
  const model = await startEmulatedChip(opts);
  return new TisDriver(model, { irq: model.irq, ...opts.driver, description: `emulated TIS chip (${opts.stateDir})`, onClose: () => model.close() });
}
