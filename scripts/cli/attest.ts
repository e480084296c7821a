// `vtpm attest`, `vtpm verify`, `vtpm eventlog`: an instance's endorsement chain (vTPM EK
// certificate → host CA certificate → hardware evidence → attestation key → hardware EK),
// its check as a remote verifier does it (offline, then a credential challenge the host's
// TPM answers), and the measured-launch log (manager/attest/).
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createPublicKey, X509Certificate } from 'node:crypto';
import type { Command } from 'commander';
import { VtpmError } from '../../drivers/base/errors.ts';
import { INSTANCE_NAME } from '../../manager/control.ts';
import { replay, type EventLog } from '../../manager/attest/measure.ts';
import { writeDurable } from '../../manager/store/sealed-file.ts';
// The X.509 machinery loads only for the commands that need it (it is most of the CLI's start-up).
const verifyLib = async () => ({ ...(await import('../../manager/attest/verify.ts')), ...(await import('../../manager/attest/challenge.ts')) });
import { control, DEFAULTS } from './host.ts';
import { printTable } from './table.ts';

const MAX_FILE = 1 << 20;

function readInput(path: string, what: string, max = MAX_FILE): Buffer {
  try {
    const b = readFileSync(path);
    if (b.length > max) throw new VtpmError('EOVERSIZE', `${what} ${path} is larger than ${max} bytes`);
    return b;
  } catch (e) {
    if (e instanceof VtpmError) throw e;
    throw new VtpmError('ENOENT', `cannot read ${what} ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/** What `vtpm verify` prints: one row per link, and whether the whole chain holds. */
interface LinkRow {
  link: string;
  status: 'good' | 'pending' | 'not checked';
  detail: string;
}

function printLinks(rows: LinkRow[], json: boolean, extra: Record<string, unknown>): void {
  const verified = rows.every((r) => r.status === 'good');
  if (json) return console.log(JSON.stringify({ verified, links: rows, ...extra }));
  printTable(['LINK', 'STATUS', 'DETAIL'], rows.map((r) => [r.link, r.status, r.detail]));
}

export function registerAttest(program: Command): void {
  const runDirOpt = ['--run-dir <dir>', 'runtime dir of the host (VTPM_RUN_DIR)'] as const;
  program
    .command('attest <name>')
    .description("write the instance's attestation chain: vTPM EK certificate(s) → host CA certificate → hardware TPM evidence (CBOR); or answer a verifier's challenge (--activate)")
    .option('--out <file>', 'write the chain here (default: NAME.attest); with --activate, the response (default: NAME.response)')
    .option('--ca-pem <file>', 'also write the host CA certificate as PEM (for openssl verify -CAfile)')
    .option('--hw-ek-out <file>', "also write the hardware TPM's TCG EK (PEM SubjectPublicKeyInfo), as this host's TPM gives it now (enrolment)")
    .option('--activate <challenge>', 'answer a challenge from vtpm verify --challenge-out (or a tpm2_makecredential file) with the hardware TPM: TPM2_ActivateCredential with its EK and attestation key')
    .option(...runDirOpt, DEFAULTS.runDir())
    .action(async (name: string, o: { out?: string; caPem?: string; hwEkOut?: string; activate?: string; runDir: string }) => {
      if (!INSTANCE_NAME.test(name)) throw new VtpmError('EINVAL', `instance name ${JSON.stringify(name)}: use 1-32 of a-z 0-9 _ -`);
      const lib = await verifyLib();
      if (o.activate) {
        const ch = lib.decodeChallenge(readInput(o.activate, 'the challenge', lib.MAX_CHALLENGE));
        const r = await control(o.runDir, 'activate', { name, ...(ch.uuid ? { uuid: ch.uuid } : {}), credentialBlob: Buffer.from(ch.credential.credentialBlob), encryptedSecret: Buffer.from(ch.credential.encryptedSecret) });
        const secret = r.secret as Uint8Array;
        const out = o.out ?? `${name}.response`;
        // tpm2-tools' format gets the bare secret, as tpm2_activatecredential -o writes it.
        writeDurable(out, ch.format === 'vtpm' ? lib.encodeResponse(ch.id!, secret) : secret, 'the response');
        console.log(`${out}: the hardware TPM activated the challenge (its EK and attestation key); send this response to the verifier`);
        return;
      }
      const r = await control(o.runDir, 'attest', { name });
      const bytes = r.document as Uint8Array;
      const doc = lib.decodeAttestation(bytes);
      const out = o.out ?? `${name}.attest`;
      writeFileSync(out, bytes);
      if (o.caPem) writeFileSync(o.caPem, new X509Certificate(doc.ca).toString());
      if (o.hwEkOut) writeFileSync(o.hwEkOut, String((await control(o.runDir, 'hw-ek')).pem));
      console.log(`${out}: ${doc.ek.map((e) => `EK certificate (${e.kind.toUpperCase()})`).join(', ')}${doc.platform ? ', platform certificate' : ''} → host CA certificate → hardware TPM evidence`);
    });
  program
    .command('verify <file>')
    .description(
      "check an attestation chain as a remote verifier holding only the hardware TPM's EK public key. Offline it checks every link but the last " +
        '(exit 2: the attestation key is not yet bound to the hardware EK); --challenge-out writes a credential challenge for the host ' +
        '(vtpm attest NAME --activate CHAL), --response checks its answer: only then is the whole chain good (exit 0)',
    )
    .requiredOption('--hw-ek <pem>', "the hardware TPM's TCG RSA EK public key, PEM or DER SubjectPublicKeyInfo (vtpm hw info --ek-out, tpm2_createek -G rsa -f pem)")
    .option('--guest-ek <pem>', "a guest's EK public key (e.g. tpm2_createek -f pem): must be one the chain certifies")
    .option('--challenge-out <file>', "write a credential challenge for the hardware EK naming the document's attestation key")
    .option('--response <file>', "the host's answer to the pending challenge (vtpm attest NAME --activate)")
    .option('--state <file>', "the verifier's state between the two steps, 0600: the challenge id and a SHA-256 commitment to its secret (default: FILE.verifier)")
    .option('--json', 'machine-readable output')
    .action(async (file: string, o: { hwEk: string; guestEk?: string; challengeOut?: string; response?: string; state?: string; json?: boolean }) => {
      if (o.challengeOut && o.response) throw new VtpmError('EINVAL', '--challenge-out and --response are the two steps: give one of them');
      const lib = await verifyLib();
      const hwEk = lib.parseHwEk(readInput(o.hwEk, 'the --hw-ek file'));
      let guest;
      if (o.guestEk) {
        try {
          guest = createPublicKey(readInput(o.guestEk, 'the --guest-ek file'));
        } catch (e) {
          throw new VtpmError('EINVAL', `--guest-ek ${o.guestEk} is not a public key (PEM or DER)`, { cause: e });
        }
      }
      const docBytes = readInput(file, 'the attestation file');
      const res = lib.verifyAttestation(lib.decodeAttestation(docBytes), guest);
      const statePath = o.state ?? `${file}.verifier`;
      const rows: LinkRow[] = [
        ...res.ek.map((e): LinkRow => ({ link: `vTPM EK certificate (${e.kind.toUpperCase()}) → host CA`, status: 'good', detail: `NV ${e.index}, ${e.fingerprint}` })),
        ...(res.platform ? [{ link: 'platform certificate → host CA', status: 'good', detail: 'signed by the host CA' } as LinkRow] : []),
        ...(o.guestEk ? [{ link: 'guest EK → vTPM EK certificate', status: 'good', detail: 'one of the certified EKs' } as LinkRow] : []),
        { link: 'host CA certificate', status: 'good', detail: res.ca },
        { link: 'hardware evidence (host CA key → attestation key)', status: 'good', detail: 'TPM2_Certify by a restricted, TPM-bound key' },
      ];
      const bind = (status: LinkRow['status'], detail: string) => rows.push({ link: lib.BIND, status, detail });
      const summary = { instance: res.instance, akName: res.akName, hwEkName: Buffer.from(hwEk.name).toString('hex') };
      if (o.challengeOut) {
        const made = lib.makeChallenge(docBytes, res.instance.uuid, Buffer.from(res.akName, 'hex'), hwEk);
        writeDurable(statePath, made.state, 'the verifier state');
        writeDurable(o.challengeOut, made.challenge, 'the challenge');
        bind('pending', `challenge in ${o.challengeOut}: vtpm attest ${res.instance.name} --activate ${o.challengeOut}, then vtpm verify --response`);
        printLinks(rows, !!o.json, { ...summary, challenge: o.challengeOut, state: statePath });
        return;
      }
      if (o.response) {
        if (!existsSync(statePath)) throw new VtpmError('ENOENT', `no challenge pending for ${file} (no ${statePath}): make one with --challenge-out (an answered challenge is used up)`);
        const state = readInput(statePath, 'the verifier state', 4096);
        lib.checkResponse(state, docBytes, hwEk, readInput(o.response, 'the response', lib.MAX_CHALLENGE));
        // A challenge is answered once: a replay of this response finds no state.
        rmSync(statePath, { force: true });
        bind('good', 'the TPM holding the --hw-ek EK activated the credential naming this attestation key');
        printLinks(rows, !!o.json, summary);
        if (!o.json) console.log(`verified: instance ${res.instance.name} (${res.instance.uuid}, TPM ${res.instance.tpm}): its EK is certified by a CA whose key is held by the TPM with the --hw-ek EK`);
        return;
      }
      bind('not checked', 'the attestation key is not yet bound to the hardware EK: run with --challenge-out');
      printLinks(rows, !!o.json, summary);
      if (!o.json) console.log('NOT VERIFIED: every offline link holds, but the attestation key is not yet bound to the hardware EK');
      process.exitCode = 2;
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
