// The vtpm CLI. Each subcommand group lives in scripts/cli/<group>.ts and registers itself
// here; errors are reported once, here, in plain words.
import { Command } from 'commander';
import { describeError, VtpmError } from '../drivers/base/errors.ts';
import { registerAttest } from './cli/attest.ts';
import { registerEngine } from './cli/engine.ts';
import { registerHw } from './cli/hw.ts';
import { registerHost, registerInstances } from './cli/host.ts';
import { registerMigration } from './cli/migrate.ts';
import { registerOci } from './cli/oci.ts';

const program = new Command('vtpm')
  .description('virtual TPMs for every guest on a host (Xen vTPM style)');
// Misuse gets one line (commander's own "error: ..."), and a non-zero exit.
registerEngine(program);
registerHw(program);
registerMigration(program, registerHost(program));
registerInstances(program);
registerAttest(program);
registerOci(program);

// What a refusal of the protected state means, in front of the detail.
const MEANING: Partial<Record<string, string>> = {
  EINTEGRITY: 'integrity check failed',
  EROLLBACK: 'rollback refused',
  EPCR: "the hardware TPM's PCRs changed",
};

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof VtpmError) {
    const meaning = MEANING[e.code];
    console.error(`vtpm: ${meaning ? `${meaning}: ` : ''}${describeError(e)}`);
  } else {
    console.error(`vtpm: ${(e as Error)?.stack ?? String(e)}`);
  }
  process.exitCode = 1;
});
