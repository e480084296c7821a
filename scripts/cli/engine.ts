// `vtpm engine selftest`: start an in-process libtpms engine of each TPM version and run
// a few commands, printing what each answered — proof that libtpms works on this host.
import type { Command } from 'commander';
import { createHash } from 'node:crypto';
import { parseResponse } from '../../drivers/tpm/command.ts';
import { MemoryStateStore, type TpmVersion } from '../../drivers/tpm/engine.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

interface Step {
  step: string;
  result: string;
}

async function exercise(version: TpmVersion, privateCopy: boolean): Promise<Step[]> {
  // Loaded here, not at the top: koffi and libtpms cost every other command ~30 ms.
  const { LibtpmsEngine } = await import('../../drivers/libtpms/libtpms-engine.ts');
  const e = new LibtpmsEngine({ version, store: new MemoryStateStore(), privateCopy });
  const steps: Step[] = [];
  try {
    if (version === '2.0') {
      parseResponse(e.process(tpm2.startup()), '2.0');
      steps.push({ step: 'TPM2_Startup(CLEAR)', result: 'TPM_RC_SUCCESS' });
      steps.push({ step: 'TPM2_GetRandom(16)', result: hex(tpm2.parseGetRandom(e.process(tpm2.getRandom(16)))) });
      const digest = createHash('sha256').update('vtpm').digest();
      tpm2.parsePcrExtend(e.process(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }])));
      const pcr = tpm2.parsePcrRead(e.process(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!;
      const expected = createHash('sha256').update(Buffer.alloc(32)).update(digest).digest('hex');
      steps.push({ step: 'PCR_Extend(16) + PCR_Read', result: `${hex(pcr)} ${hex(pcr) === expected ? '(matches SHA-256 computed here)' : '(MISMATCH)'}` });
      const props = tpm2.parseGetCapability(e.process(tpm2.getCapability(tpm2.TPM_CAP_TPM_PROPERTIES, tpm2.TPM_PT_MANUFACTURER, 1)));
      const m = props.properties?.get(tpm2.TPM_PT_MANUFACTURER) ?? 0;
      steps.push({ step: 'GetCapability(manufacturer)', result: Buffer.from([m >>> 24, m >>> 16, m >>> 8, m]).toString('latin1') });
    } else {
      parseResponse(e.process(tpm12.startup()), '1.2');
      steps.push({ step: 'TPM_Startup(ST_CLEAR)', result: 'TPM_SUCCESS' });
      steps.push({ step: 'TPM_GetRandom(16)', result: hex(tpm12.parseGetRandom(e.process(tpm12.getRandom(16)))) });
      const digest = createHash('sha1').update('vtpm').digest();
      const pcr = tpm12.parseExtend(e.process(tpm12.extend(10, digest)));
      const expected = createHash('sha1').update(Buffer.alloc(20)).update(digest).digest('hex');
      steps.push({ step: 'TPM_Extend(10)', result: `${hex(pcr)} ${hex(pcr) === expected ? '(matches SHA-1 computed here)' : '(MISMATCH)'}` });
      const v = tpm12.parseVersionInfo(tpm12.parseGetCapability(e.process(tpm12.getCapability(tpm12.TPM_CAP_VERSION_VAL))));
      steps.push({ step: 'GetCapability(version)', result: `${v.version} vendor ${v.vendor}` });
    }
  } finally {
    e.terminate();
  }
  return steps;
}

export function registerEngine(program: Command): void {
  const engine = program.command('engine').description('the libtpms engine on this host');
  engine
    .command('selftest')
    .description('start an engine of each TPM version in this process and run a few commands')
    .option('--tpm <version>', 'only this TPM version (1.2 or 2.0)')
    .option('--json', 'machine-readable output')
    .action(async (opts: { tpm?: string; json?: boolean }) => {
      const versions: TpmVersion[] = opts.tpm ? [opts.tpm as TpmVersion] : ['2.0', '1.2'];
      const all: Record<string, Step[]> = {};
      // The second engine in one process needs its own copy of libtpms (global state).
      for (const [i, v] of versions.entries()) all[v] = await exercise(v, i > 0);
      if (opts.json) return console.log(JSON.stringify(all, null, 2));
      for (const [v, steps] of Object.entries(all)) {
        console.log(`TPM ${v} (libtpms, in process):`);
        for (const s of steps) console.log(`  ${s.step.padEnd(28)} ${s.result}`);
      }
    });
}
