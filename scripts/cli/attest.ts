// `vtpm attest`, `vtpm verify`, `vtpm eventlog`: an instance's endorsement chain (vTPM EK
// certificate → host CA certificate → hardware evidence), its check as a remote verifier
// does it, and the measured-launch log (manager/attest/).
import { readFileSync, writeFileSync } from 'node:fs';
import { createPublicKey, X509Certificate } from 'node:crypto';
import type { Command } from 'commander';
import { VtpmError } from '../../drivers/base/errors.ts';
import { INSTANCE_NAME } from '../../manager/control.ts';
import { replay, type EventLog } from '../../manager/attest/measure.ts';
// The X.509 machinery loads only for the commands that need it (it is most of the CLI's start-up).
const verifyLib = () => import('../../manager/attest/verify.ts');
import { control, DEFAULTS } from './host.ts';
import { printTable } from './table.ts';

const MAX_FILE = 1 << 20;

function readInput(path: string, what: string): Buffer {
  try {
    const b = readFileSync(path);
    if (b.length > MAX_FILE) throw new VtpmError('EOVERSIZE', `${what} ${path} is larger than ${MAX_FILE} bytes`);
    return b;
  } catch (e) {
    if (e instanceof VtpmError) throw e;
    throw new VtpmError('ENOENT', `cannot read ${what} ${path}: ${(e as Error).message}`, { cause: e });
  }
}

export function registerAttest(program: Command): void {
  const runDirOpt = ['--run-dir <dir>', 'runtime dir of the host (VTPM_RUN_DIR)'] as const;
  program
    .command('attest <name>')
    .description("write the instance's attestation chain: vTPM EK certificate(s) → host CA certificate → hardware TPM evidence (CBOR)")
    .option('--out <file>', 'write the chain here (default: NAME.attest)')
    .option('--ca-pem <file>', 'also write the host CA certificate as PEM (for openssl verify -CAfile)')
    .option('--hw-ek-out <file>', "also write the hardware TPM's endorsement attestation key, as this host's TPM gives it now (enrolment)")
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (name: string, o: { out?: string; caPem?: string; hwEkOut?: string; runDir: string }) => {
      if (!INSTANCE_NAME.test(name)) throw new VtpmError('EINVAL', `instance name ${JSON.stringify(name)}: use 1-32 of a-z 0-9 _ -`);
      const r = await control(o.runDir, 'attest', { name });
      const bytes = r.document as Uint8Array;
      const { decodeAttestation, formatHwEk } = await verifyLib();
      const doc = decodeAttestation(bytes);
      const out = o.out ?? `${name}.attest`;
      writeFileSync(out, bytes);
      if (o.caPem) writeFileSync(o.caPem, new X509Certificate(doc.ca).toString());
      if (o.hwEkOut) {
        const k = await control(o.runDir, 'hw-ek');
        writeFileSync(o.hwEkOut, formatHwEk(k.public as Uint8Array, String(k.pem)));
      }
      console.log(`${out}: ${doc.ek.map((e) => `EK certificate (${e.kind.toUpperCase()})`).join(', ')}${doc.platform ? ', platform certificate' : ''} → host CA certificate → hardware TPM evidence`);
    });
  program
    .command('verify <file>')
    .description('check every link of an attestation chain as a remote verifier, from the hardware TPM key alone')
    .requiredOption('--hw-ek <pem>', "the hardware TPM's endorsement attestation key (vtpm hw info --ek-out)")
    .option('--guest-ek <pem>', "a guest's EK public key (e.g. tpm2_createek -f pem): must be one the chain certifies")
    .option('--json', 'machine-readable output')
    .action(async (file: string, o: { hwEk: string; guestEk?: string; json?: boolean }) => {
      const { decodeAttestation, parseHwEk, verifyAttestation } = await verifyLib();
      const hwEk = parseHwEk(readInput(o.hwEk, 'the --hw-ek file').toString('utf8'));
      let guest;
      if (o.guestEk) {
        try {
          guest = createPublicKey(readInput(o.guestEk, 'the --guest-ek file'));
        } catch (e) {
          throw new VtpmError('EINVAL', `--guest-ek ${o.guestEk} is not a public key (PEM or DER)`, { cause: e });
        }
      }
      const res = verifyAttestation(decodeAttestation(readInput(file, 'the attestation file')), hwEk, guest);
      if (o.json) return console.log(JSON.stringify({ ok: true, ...res }));
      console.log(`verified: instance ${res.instance.name} (${res.instance.uuid}, TPM ${res.instance.tpm})`);
      for (const e of res.ek) console.log(`  EK certificate ${e.kind.toUpperCase()} (NV ${e.index}) signed by the host CA  ${e.fingerprint}`);
      if (res.platform) console.log('  platform certificate signed by the host CA');
      console.log(`  host CA "${res.ca}": its key is held by the hardware TPM (TPM2_Certify by the --hw-ek key)`);
      if (o.guestEk) console.log("  the guest's EK is one of the certified EKs");
    });
  program
    .command('eventlog')
    .description('the measured-launch log: each vtpmd launch extended into a hardware PCR (replayed against the PCR)')
    .option(...runDirOpt, DEFAULTS.runDir())
    .option('--json', 'machine-readable output (the log, the PCR value, the replayed value)')
    .action(async (o: { runDir: string; json?: boolean }) => {
      const r = await control(o.runDir, 'eventlog');
      const log: EventLog = { pcr: Number(r.pcr), bank: 'sha256', initial: String(r.initial), events: r.events as EventLog['events'] };
      const value = String(r.value);
      const replayed = replay(log);
      if (o.json) return console.log(JSON.stringify({ ...log, value, replayed, matches: replayed === value }));
      if (log.events.length === 0) console.log('no launch measured since the PCR was last reset');
      else printTable(['SEQ', 'TIME', 'INSTANCE', 'TPM', 'GUEST', 'CODE', 'CONFIG'], log.events.map((e) => [String(e.seq), e.time, e.name, e.tpm, e.guest, e.code.slice(0, 16), e.config.slice(0, 16)]));
      if (!/^0+$/.test(log.initial)) console.log(`the log starts from PCR ${log.pcr} = ${log.initial}, a value it does not explain`);
      console.log(`PCR ${log.pcr} (sha256): ${value}`);
      console.log(`replayed log:      ${replayed} ${replayed === value ? '(matches)' : '(DOES NOT MATCH the PCR)'}`);
      if (replayed !== value) process.exitCode = 1;
    });
}
