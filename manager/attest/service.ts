// Attestation as the host uses it: the host CA (host-ca.ts), each instance's endorsement
// made at create (provision.ts) and kept beside the state as public data
// (STATE/attest/<uuid>.cbor: certificates only, checked by whoever verifies them), the
// attestation document `vtpm attest` hands out, and measured launch (measure.ts), which
// launch.ts reaches through measureLaunch() before each vtpmd starts.
import { createHash, X509Certificate } from 'node:crypto';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { readBounded } from '../../drivers/host/state-dir.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { asBuffer, bytesField, checkRecord, decodeRecord, FORMAT_VERSION, writeDurable } from '../store/sealed-file.ts';
import { HostCa } from './host-ca.ts';
import { activateInHardware, hardwareEk, type HardwareEk } from './hw-ek.ts';
import type { Credential } from '../../drivers/tpm/tpm2-credential.ts';
import { MeasuredLaunch, type EventLog } from './measure.ts';
import { provision, type Endorsement } from './provision.ts';
import { encodeAttestation, type EkEntry } from './verify.ts';

const MAX_ENDORSEMENT = 32 * 1024;
/** The measured-launch log of each host in this process, by run dir. */
const launches = new Map<string, MeasuredLaunch>();

/** Called by launch.ts before a vtpmd starts: extend the host's launch PCR, log the event. */
export async function measureLaunch(runDir: string, i: { name: string; uuid: string; tpm: string; guest: string }): Promise<void> {
  await launches.get(runDir)?.measure(i);
}

export interface InstanceRef {
  name: string;
  uuid: string;
  tpm: '1.2' | '2.0';
}

export class Attestation {
  private constructor(
    private readonly hw: HardwareTpm,
    private readonly stateDir: string,
    private readonly runDir: string,
    readonly ca: HostCa,
    private readonly launch: MeasuredLaunch,
    private readonly log: (l: string) => void,
  ) {}

  static async open(hw: HardwareTpm, o: { stateDir: string; runDir: string; rootKey: Uint8Array; log: (l: string) => void }): Promise<Attestation> {
    const ca = await HostCa.open(hw, o.stateDir, o.rootKey, o.log);
    const launch = await MeasuredLaunch.open(hw, o.runDir, MeasuredLaunch.pcrFromEnv(), o.log);
    launches.set(o.runDir, launch);
    return new Attestation(hw, o.stateDir, o.runDir, ca, launch, o.log);
  }

  close(): void {
    if (launches.get(this.runDir) === this.launch) launches.delete(this.runDir);
  }

  private file(uuid: string): string {
    return join(this.stateDir, 'attest', `${uuid}.cbor`);
  }

  /** Endorse a new instance: run it (`run.start` gives its node), create its EK(s) and
   *  write the certificates into it, stop it (`run.stop`, also after a failure). */
  async provision(rec: InstanceRef, run: { start: () => Promise<string>; stop: () => Promise<void> }): Promise<void> {
    const node = await run.start();
    let made: Endorsement;
    try {
      made = await provision(node, rec.tpm, rec.uuid, this.ca, createHash('sha256').update(this.ca.certificate).digest('hex').slice(0, 32));
    } finally {
      await run.stop();
    }
    mkdirSync(join(this.stateDir, 'attest'), { recursive: true, mode: 0o700 });
    const rec2 = { v: FORMAT_VERSION, uuid: rec.uuid, ek: made.ek.map((e) => ({ kind: e.kind, index: e.index, certificate: asBuffer(e.certificate) })), ...(made.platform ? { platform: asBuffer(made.platform) } : {}) };
    writeDurable(this.file(rec.uuid), encode(rec2), 'the endorsement record');
    this.log(`instance ${rec.name}: EK certificate(s) ${made.ek.map((e) => `${e.kind.toUpperCase()} at 0x${e.index.toString(16)}`).join(', ')} issued by the host CA`);
  }

  /** Every instance created here since the host CA exists was endorsed here (a create
   *  whose endorsement fails is undone), so an instance without a record that is younger
   *  than the CA was created on another host and migrated here. */
  private whyNoRecord(rec: InstanceRef & { created: string }): string {
    const caSince = new Date(new X509Certificate(this.ca.certificate).validFrom);
    const created = new Date(rec.created);
    const head = `instance ${rec.name} has no attestation record on this host: this host's CA did not endorse it`;
    if (created.getTime() >= caSince.getTime()) {
      return `${head}. It was created (${rec.created}) after this host's CA (${caSince.toISOString()}), so on another host, and migrated here: the EK certificates in its NV were issued by that host's CA, which only that host's hardware TPM can vouch for`;
    }
    return `${head}. It was created (${rec.created}) before this host's CA (${caSince.toISOString()}): before attestation existed here, or on another host it was migrated from`;
  }

  remove(uuid: string): void {
    rmSync(this.file(uuid), { force: true });
  }

  /** The attestation document of an instance: its EK certificate(s) → host CA → evidence. */
  document(rec: InstanceRef & { created: string }): Uint8Array {
    const what = `the endorsement record of ${rec.name}`;
    const bytes = readBounded(this.file(rec.uuid), MAX_ENDORSEMENT, what);
    if (!bytes) throw new VtpmError('ENOENT', this.whyNoRecord(rec));
    const f = decodeRecord(bytes, what, ['v', 'uuid', 'ek'], ['platform']);
    if (f.uuid !== rec.uuid || !Array.isArray(f.ek)) throw new VtpmError('EINTEGRITY', `${what} is for another instance`);
    const ek = f.ek.map((v: unknown) => {
      const e = checkRecord(v, what, ['kind', 'index', 'certificate']);
      return { kind: e.kind, index: e.index, certificate: bytesField(e, 'certificate', what) } as EkEntry;
    });
    return encodeAttestation({
      instance: { name: rec.name, uuid: rec.uuid, tpm: rec.tpm },
      ek,
      ...(f.platform !== undefined ? { platform: bytesField(f, 'platform', what) } : {}),
      ca: this.ca.certificate,
      evidence: this.ca.evidence,
    });
  }

  /** The hardware TPM's TCG EK, asked of the TPM now (what a verifier trusts). */
  hardwareKey(): Promise<HardwareEk> {
    return hardwareEk(this.hw);
  }

  /** A verifier's credential challenge, answered by the hardware TPM (ActivateCredential
   *  with its EK and the attestation key that certified the host CA). */
  async activate(cred: Credential): Promise<Uint8Array> {
    const secret = await activateInHardware(this.hw, cred);
    this.log('a credential challenge was activated by the hardware TPM (EK and attestation key)');
    return secret;
  }

  eventLog(): Promise<EventLog & { value: string }> {
    return this.launch.read();
  }
}
