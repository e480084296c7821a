// Soak: 10,000 mixed commands (NV writes, PCR extends, HMAC sessions used for an NV write,
// key creates, random) through one manager-started guest's tpm0, every process of the
// stack (manager, authority, vtpmd, front end) sampled for RSS: no error, and memory flat
// after the warm-up (≤ 10 % growth).
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { permanent, Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import { eccSigningTemplate, eccStorageTemplate, TPMA_NV } from '../../drivers/tpm/tpm2-structures.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TpmDevice } from '../../drivers/tpm_dev/device.ts';
import { runTool } from '../clients/run.ts';
import { stopHostAfterTest, vtpm } from '../guest/host.ts';

const COMMANDS = Number(process.env.VTPM_SOAK_COMMANDS ?? 10_000);
const WARMUP = Math.floor(COMMANDS / 5);

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

t.test(`soak: ${COMMANDS} mixed commands through a manager-started guest, memory flat after warm-up`, async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'vtpm-soak-'));
  const run = join(base, 'run');
  const args = ['--run-dir', run];
  t.teardown(async () => {
    try {
      await stopHostAfterTest(run);
    } finally {
      rmSync(base, { recursive: true, force: true });
    }
  });
  const ok = async (a: string[]) => {
    const r = await vtpm([...a, ...args], 120_000);
    if (r.code !== 0) throw new Error(`vtpm ${a.join(' ')}: ${r.stderr}`);
    return r.stdout.trim();
  };
  await ok(['host', 'start', '--state-dir', join(base, 'state'), '--hw', `tis:${join(base, 'hwtpm')}`]);
  await ok(['create', 'soak']);
  const node = await ok(['start', 'soak']);
  const pids: Record<string, number> = {};
  const pgrep = async (what: string, pattern: string) => (pids[what] = Number((await runTool('pgrep', ['-f', pattern])).stdout.trim().split('\n')[0]));
  await pgrep('manager', `manager/daemon.js --state-dir ${join(base, 'state')}`);
  await pgrep('authority', `drivers/xen/authority.js --dir ${run}`);
  // A warm vtpmd's command line does not name its instance: its pid is in the listing.
  pids.vtpmd = (JSON.parse(await ok(['list', '--json'])) as { name: string; vtpmd?: { pid: number } }[]).find((i) => i.name === 'soak')?.vtpmd?.pid ?? 0;
  await pgrep('front', `drivers/tpmfront/frontd.js --dir ${run}`);
  for (const [k, v] of Object.entries(pids)) t.ok(v > 0, `${k} pid ${v}`);

  const dev = await TpmDevice.open(node);
  t.teardown(() => dev.close());
  const c = new Tpm2Client(dev);
  const index = 0x1500050;
  await c.nvDefineSpace({ index, nameAlg: tpm2.TPM_ALG_SHA256, attributes: TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE, authPolicy: new Uint8Array(0), dataSize: 32 });
  const srk = await c.createPrimary(permanent(tpm2.TPM_RH_OWNER), eccStorageTemplate());
  const samples: Record<string, number[]> = Object.fromEntries(Object.keys(pids).map((k) => [k, []]));
  let errors = 0;
  let sent = 0;
  const digest = new Uint8Array(32);
  for (let i = 0; i < COMMANDS; ) {
    try {
      switch (i % 10) {
        case 0:
        case 1:
        case 2: {
          digest[0] = i & 0xff;
          await c.nvWrite(index, digest); // ReadPublic + NV_Write: a state store per write
          i += 2;
          break;
        }
        case 3:
        case 4:
        case 5:
          await c.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }]);
          i += 1;
          break;
        case 6: {
          const s = await c.startAuthSession({ type: TPM_SE.HMAC });
          await c.nvWrite(index, digest, 0, s);
          await c.flushContext(s.handle);
          i += 4;
          break;
        }
        default:
          if (i % 100 === 7) {
            await c.create(srk, eccSigningTemplate()); // a key create now and then (ECC keygen)
          } else {
            await c.getRandom(16);
          }
          i += 1;
      }
    } catch (e) {
      errors++;
      if (errors < 5) t.comment(`command ${i}: ${(e as Error).message}`);
      i++;
    }
    if (Math.floor(i / 250) !== Math.floor(sent / 250)) for (const [k, pid] of Object.entries(pids)) samples[k]!.push(rssKb(pid));
    sent = i;
  }
  await c.flushContext(srk.handle);
  t.equal(errors, 0, `${COMMANDS} commands, no error`);
  const firstAfterWarmup = Math.floor(WARMUP / 250);
  for (const [k, s] of Object.entries(samples)) {
    const after = s.slice(firstAfterWarmup);
    const at = after[0]!;
    const peak = Math.max(...after);
    t.ok(peak <= at * 1.1, `${k}: RSS ${at} kB after warm-up, peak ${peak} kB later (${(((peak - at) / at) * 100).toFixed(1)} % growth, ≤ 10 %)`);
  }
});
