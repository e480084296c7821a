// Measured launch: before a vtpmd starts, the manager extends a hardware PCR (default 23,
// VTPM_MEASURE_PCR to choose another) with the digest of the code vtpmd runs and of the
// instance's configuration, and appends the event to a log, so a verifier who reads the
// PCR (a quote) and the log can tell which code serves which instance. The log (CBOR,
// RUN/eventlog.cbor, lives as long as the PCR's value does: until the chip resets):
//   { v: 1, pcr, bank: 'sha256', initial: hex, events: [event...] }
//   event = { seq, time, name, uuid, tpm, guest, code: hex, config: hex, digest: hex }
//   code   = SHA-256 over the files of build/vtpmd and build/drivers in path order:
//            for each, relpath, NUL, SHA-256(content)
//   config = SHA-256(UTF-8 JSON of [name, uuid, tpm, guest])
//   digest = SHA-256(code || config);   replay: P = initial; P = SHA-256(P || digest)
// `initial` is zero when the log starts with the PCR at zero (or reset: PCRs 16 and 23 are
// resettable in the PC Client profile); otherwise it is the value found, which the log
// cannot explain (said plainly by `vtpm eventlog`).
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { decode, encode } from 'cbor-x';
import { VtpmError } from '../../drivers/base/errors.ts';
import { BUILD_DIR } from '../../drivers/base/modules.ts';
import { readBounded, writeFileAtomic } from '../../drivers/host/state-dir.ts';
import { CommandQueue } from '../../drivers/tpm/serial.ts';
import { TPM_ALG_SHA256 } from '../../drivers/tpm/tpm2.ts';
import { parseEmpty, pcrReset } from '../../drivers/tpm/tpm2-attest.ts';
import type { HardwareTpm } from '../../drivers/tpm/transport.ts';
import { hardwareClient } from '../hardware/client.ts';

export const DEFAULT_MEASURE_PCR = 23;
const RESETTABLE = new Set([16, 23]);
const LOG_FILE = 'eventlog.cbor';
const MAX_LOG = 8 << 20;
const ZERO = '0'.repeat(64);

export interface LaunchEvent {
  seq: number;
  time: string;
  name: string;
  uuid: string;
  tpm: string;
  guest: string;
  code: string;
  config: string;
  digest: string;
}
export interface EventLog {
  pcr: number;
  bank: 'sha256';
  initial: string;
  events: LaunchEvent[];
}

const sha = (...parts: (Uint8Array | string)[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

const fileCache = new Map<string, { key: string; digest: Buffer }>();

/** The code digest of the trees vtpmd runs from (file digests cached by inode, size, mtime). */
export function codeDigest(roots: string[] = [join(BUILD_DIR, 'vtpmd'), join(BUILD_DIR, 'drivers')]): string {
  const files: { rel: string; path: string }[] = [];
  const walk = (root: string, dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(root, p);
      else if (e.isFile()) files.push({ rel: `${relative(join(root, '..'), p)}`, path: p });
    }
  };
  for (const r of roots) walk(r, r);
  files.sort((a, b) => (a.rel < b.rel ? -1 : a.rel > b.rel ? 1 : 0));
  const h = createHash('sha256');
  for (const f of files) {
    const st = statSync(f.path);
    const key = `${st.ino}:${st.size}:${st.mtimeMs}`;
    let c = fileCache.get(f.path);
    if (c?.key !== key) fileCache.set(f.path, (c = { key, digest: sha(readFileSync(f.path)) }));
    h.update(f.rel).update('\0').update(c.digest);
  }
  return h.digest('hex');
}

export const configDigest = (e: Pick<LaunchEvent, 'name' | 'uuid' | 'tpm' | 'guest'>) => sha(JSON.stringify([e.name, e.uuid, e.tpm, e.guest])).toString('hex');
export const eventDigest = (code: string, config: string) => sha(Buffer.from(code, 'hex'), Buffer.from(config, 'hex')).toString('hex');

/** Replay the log: the PCR value it predicts; EINTEGRITY naming the first event whose
 *  recorded digests do not follow from its contents. */
export function replay(log: EventLog): string {
  let p = Buffer.from(log.initial, 'hex');
  for (const e of log.events) {
    if (configDigest(e) !== e.config) throw new VtpmError('EINTEGRITY', `event ${e.seq} (${e.name}): its config digest does not match its fields`);
    if (eventDigest(e.code, e.config) !== e.digest) throw new VtpmError('EINTEGRITY', `event ${e.seq} (${e.name}): its digest is not SHA-256(code || config)`);
    p = sha(p, Buffer.from(e.digest, 'hex'));
  }
  return p.toString('hex');
}

export class MeasuredLaunch {
  private readonly queue = new CommandQueue();
  private constructor(
    private readonly hw: HardwareTpm,
    private readonly file: string,
    private log: EventLog,
  ) {}

  static pcrFromEnv(): number {
    const v = process.env.VTPM_MEASURE_PCR;
    if (v === undefined || v === '') return DEFAULT_MEASURE_PCR;
    if (!/^\d{1,2}$/.test(v) || Number(v) > 23) throw new VtpmError('EINVAL', `VTPM_MEASURE_PCR=${JSON.stringify(v)} is not a PCR number 0-23`);
    return Number(v);
  }

  /** The log for the PCR's current value: continued when it still replays to it, else new. */
  static async open(hw: HardwareTpm, runDir: string, pcr: number, log: (l: string) => void): Promise<MeasuredLaunch> {
    const file = join(runDir, LOG_FILE);
    let value = await readPcr(hw, pcr);
    const prev = loadLog(file);
    if (prev && prev.pcr === pcr) {
      try {
        if (replay(prev) === value) return new MeasuredLaunch(hw, file, prev);
      } catch {
        // a log that does not replay is replaced below
      }
    }
    if (value !== ZERO && RESETTABLE.has(pcr)) {
      parseEmpty(await hw.transmit(pcrReset(pcr)));
      value = await readPcr(hw, pcr);
    }
    if (value !== ZERO) log(`measured launch: PCR ${pcr} holds ${value}, which no log explains; the new log starts from it`);
    const m = new MeasuredLaunch(hw, file, { pcr, bank: 'sha256', initial: value, events: [] });
    m.save();
    return m;
  }

  /** Extend the PCR for one launch of a vtpmd and log it (one at a time: log order is PCR order). */
  measure(i: { name: string; uuid: string; tpm: string; guest: string }): Promise<LaunchEvent> {
    return this.queue.run(async () => {
      const code = codeDigest();
      const config = configDigest(i);
      const digest = eventDigest(code, config);
      const c = await hardwareClient(this.hw);
      await c.pcrExtend(this.log.pcr, [{ alg: TPM_ALG_SHA256, digest: Buffer.from(digest, 'hex') }]);
      const ev: LaunchEvent = { seq: this.log.events.length, time: new Date().toISOString(), name: i.name, uuid: i.uuid, tpm: i.tpm, guest: i.guest, code, config, digest };
      this.log = { ...this.log, events: [...this.log.events, ev] };
      this.save();
      return ev;
    });
  }

  /** The log and the PCR's value now (read once the extends queued before have run). */
  read(): Promise<EventLog & { value: string }> {
    return this.queue.run(async () => ({ ...this.log, value: await readPcr(this.hw, this.log.pcr) }));
  }

  private save(): void {
    writeFileAtomic(this.file, encode({ v: 1, ...this.log }));
  }
}

async function readPcr(hw: HardwareTpm, pcr: number): Promise<string> {
  const c = await hardwareClient(hw);
  const r = await c.pcrRead([{ alg: TPM_ALG_SHA256, pcrs: [pcr] }]);
  const d = r.digests[0];
  if (!d) throw new VtpmError('EIO', `the hardware TPM returned no SHA-256 value for PCR ${pcr}`);
  return Buffer.from(d).toString('hex');
}

function loadLog(file: string): EventLog | undefined {
  try {
    const bytes = readBounded(file, MAX_LOG, 'the measured-launch log');
    if (!bytes) return undefined;
    const v = decode(bytes) as EventLog & { v?: number };
    if (v?.v !== 1 || !Array.isArray(v.events) || typeof v.initial !== 'string' || typeof v.pcr !== 'number') return undefined;
    return { pcr: v.pcr, bank: 'sha256', initial: v.initial, events: v.events };
  } catch {
    return undefined; // unreadable: a new log (the PCR is reset or its value recorded)
  }
}
