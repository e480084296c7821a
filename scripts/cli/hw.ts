// `vtpm hw info --hw tis|tis:DIR|device:PATH`: talk to the host's hardware TPM (the emulated
// TIS chip or a device node) and print what it is, so a user can see it is usable.
import type { Command } from 'commander';
import * as path from 'node:path';
import { writeFileSync } from 'node:fs';
import { VtpmError } from '../../drivers/base/errors.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { addBootEvent } from '../../drivers/hwtpm/firmware.ts';
// The attestation code loads only for the EK's print-out / --ek-out.
const hwEkLib = () => import('../../manager/attest/hw-ek.ts');

const ALG_NAME: Record<number, string> = { 0x4: 'sha1', 0xb: 'sha256', 0xc: 'sha384', 0xd: 'sha512', 0x12: 'sm3_256' };
const hex8 = (v: number) => (v >>> 0).toString(16).padStart(8, '0');
const chars = (v: number) => Buffer.from([v >>> 24, v >>> 16, v >>> 8, v]).toString('latin1').replace(/[^\x20-\x7e]/g, '');

export interface HwInfo {
  hardware: string;
  startedNow: boolean;
  manufacturer: string;
  vendor: string;
  firmware: string;
  banks: { alg: string; pcrs: number }[];
  pcr: { index: number; bank: string; value: string };
}

/** The --hw option as openHardware's spec: plain `tis` (the old form) keeps the chip's
 *  NVRAM in <state-dir>/hwtpm. */
export function hwSpec(hw: string, stateDir: string): string {
  if (hw === 'tis') return `tis:${path.join(path.resolve(stateDir), 'hwtpm')}`;
  if ((hw.startsWith('tis:') && hw.length > 4) || (hw.startsWith('device:') && hw.length > 7)) return hw;
  throw new VtpmError('EINVAL', `--hw must be "tis" or "device:PATH" (or "tis:DIR"), not ${JSON.stringify(hw)}`);
}

export async function hwInfo(tpm: HardwareTpm): Promise<HwInfo> {
  const c = new Tpm2Client(tpm);
  // The firmware of a real machine sends Startup at boot; an emulated chip needs it here.
  const startedNow = await c.startup();
  const props = (await c.getCapability(tpm2.TPM_CAP_TPM_PROPERTIES, tpm2.TPM_PT_MANUFACTURER, 8)).properties ?? new Map<number, number>();
  const get = (p: number) => props.get(p) ?? 0;
  const fw1 = get(tpm2.TPM_PT_FIRMWARE_VERSION_1);
  const fw2 = get(tpm2.TPM_PT_FIRMWARE_VERSION_2);
  const banks = ((await c.getCapability(tpm2.TPM_CAP_PCRS, 0, 1)).pcrs ?? []).filter((b) => b.pcrs.length > 0);
  const bank = banks.find((b) => b.alg === tpm2.TPM_ALG_SHA256) ?? banks[0];
  if (!bank) throw new VtpmError('EIO', 'the TPM has no PCR bank allocated');
  const read = await c.pcrRead([{ alg: bank.alg, pcrs: [0] }]);
  return {
    hardware: tpm.description,
    startedNow,
    manufacturer: chars(get(tpm2.TPM_PT_MANUFACTURER)),
    vendor: [0x106, 0x107, 0x108, 0x109].map((p) => chars(get(p))).join(''),
    firmware: `${hex8(fw1)}.${hex8(fw2)}`,
    banks: banks.map((b) => ({ alg: ALG_NAME[b.alg] ?? `0x${b.alg.toString(16)}`, pcrs: b.pcrs.length })),
    pcr: { index: 0, bank: ALG_NAME[bank.alg] ?? `0x${bank.alg.toString(16)}`, value: Buffer.from(read.digests[0] ?? []).toString('hex') },
  };
}

export function registerHw(program: Command): void {
  const hw = program.command('hw').description("the host's hardware TPM (emulated TIS chip or a TPM device)");
  hw.command('measure <what>')
    .description("add a measurement of WHAT to the emulated chip's firmware boot log (replayed at each power-on): models a firmware or boot-loader change")
    .requiredOption('--hw <spec>', 'tis:DIR (the emulated chip)')
    .requiredOption('--pcr <n>', 'the PCR it is extended into (0-23)')
    .action((what: string, o: { hw: string; pcr: string }) => {
      if (!o.hw.startsWith('tis:') || o.hw.length < 5) throw new VtpmError('EINVAL', 'only an emulated chip (--hw tis:DIR) has a modelled firmware');
      if (!/^\d{1,2}$/.test(o.pcr)) throw new VtpmError('EINVAL', `--pcr ${JSON.stringify(o.pcr)} is not a PCR number`);
      const ev = addBootEvent(o.hw.slice(4), Number(o.pcr), what);
      console.log(`boot log: PCR ${ev.pcr} += sha256(${JSON.stringify(what)}) = ${Buffer.from(ev.digest).toString('hex')}`);
    });
  hw.command('info')
    .description('print manufacturer, firmware, PCR banks and a PCR read')
    .requiredOption('--hw <kind>', 'tis (the emulated chip behind the TIS model, NVRAM in <state-dir>/hwtpm), tis:DIR, or device:PATH')
    .option('--state-dir <dir>', "host state dir (the emulated chip's NVRAM lives in <dir>/hwtpm)", process.env.VTPM_STATE_DIR ?? '/var/lib/vtpm')
    .option('--json', 'machine-readable output')
    .option('--ek-out <file>', "write the TPM's TCG EK (RSA 2048, template L-1: the key tpm2_createek -G rsa makes) to FILE as a PEM SubjectPublicKeyInfo: what vtpm verify --hw-ek trusts")
    .action(async (o: { hw: string; stateDir: string; json?: boolean; ekOut?: string }) => {
      // Loaded here: the chip model and koffi cost every other vtpm command ~40 ms.
      const { openHardware } = await import('../../drivers/hwtpm/open.ts');
      const tpm = await openHardware(hwSpec(o.hw, o.stateDir));
      try {
        const info = await hwInfo(tpm);
        // The verifier's anchor: recreated from the chip's endorsement seed (manager/attest/hw-ek.ts).
        const ek = await (await hwEkLib()).hardwareEk(tpm);
        if (o.ekOut) writeFileSync(o.ekOut, ek.pem);
        const ekName = Buffer.from(ek.name).toString('hex');
        if (o.json) {
          console.log(JSON.stringify({ ...info, endorsementKey: ek.pem, endorsementKeyName: ekName }, null, 2));
          return;
        }
        console.log(`hardware TPM:  ${info.hardware}${info.startedNow ? ' (sent TPM2_Startup)' : ''}`);
        console.log(`manufacturer:  ${info.manufacturer}${info.vendor ? ` (${info.vendor})` : ''}`);
        console.log(`firmware:      ${info.firmware}`);
        console.log(`PCR banks:     ${info.banks.map((b) => `${b.alg} (${b.pcrs} PCRs)`).join(', ')}`);
        console.log(`PCR ${info.pcr.index} ${info.pcr.bank}:  ${info.pcr.value}`);
        console.log(`EK name:       ${ekName}`);
        console.log(`endorsement key (TCG RSA EK; vtpm verify --hw-ek):\n${ek.pem.trimEnd()}`);
      } finally {
        await tpm.close();
      }
    });
}
