// The vtpm CLI. Each subcommand group lives in scripts/cli/<group>.ts and registers itself
// here; errors are reported once, here, in plain words.
import { Command } from 'commander';
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import { registerEngine } from './cli/engine.ts';
import { registerHw } from './cli/hw.ts';
import { registerGuest, registerHost } from './cli/guest.ts';

const program = new Command('vtpm')
  .description('virtual TPMs for every guest on a host (Xen vTPM style)')
  .showHelpAfterError();
registerEngine(program);
registerHw(program);
registerGuest(program);
registerHost(program);

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof VtpmError) {
    console.error(`vtpm: ${describeError(e)}`);
  } else {
    console.error(`vtpm: ${(e as Error)?.stack ?? String(e)}`);
  }
  process.exitCode = 1;
});
