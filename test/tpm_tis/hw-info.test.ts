// `vtpm hw info --hw tis` end to end: the CLI process starts the emulated chip in the
// given state dir, and prints what the chip says about itself.
import t from 'tap';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const root = path.resolve(import.meta.dirname, '../..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-hw-info-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

const vtpm = (...args: string[]) => run(process.execPath, ['--import', 'tsx', path.join(root, 'scripts/vtpm.ts'), ...args], { cwd: root, timeout: 30_000 });

t.test('--json on the emulated TIS chip', async (t) => {
  const { stdout } = await vtpm('hw', 'info', '--hw', 'tis', '--state-dir', dir, '--json');
  const info = JSON.parse(stdout) as { manufacturer: string; firmware: string; banks: { alg: string; pcrs: number }[]; pcr: { bank: string; value: string }; startedNow: boolean };
  t.equal(info.manufacturer, 'IBM', 'libtpms reports IBM');
  t.match(info.firmware, /^[0-9a-f]{8}\.[0-9a-f]{8}$/);
  t.same(info.banks.find((b) => b.alg === 'sha256'), { alg: 'sha256', pcrs: 24 });
  t.same(info.pcr, { index: 0, bank: 'sha256', value: '0'.repeat(64) });
  t.equal(info.startedNow, true, 'a powered-on chip needed Startup');
  t.ok(fs.existsSync(path.join(dir, 'hwtpm')), 'the chip NVRAM dir is <state-dir>/hwtpm');
});

t.test('plain output, and a bad --hw is refused in words', async (t) => {
  const { stdout } = await vtpm('hw', 'info', '--hw', 'tis', '--state-dir', dir);
  t.match(stdout, /manufacturer: +IBM/);
  t.match(stdout, /PCR banks: +sha1 \(24 PCRs\), sha256 \(24 PCRs\)/);
  t.match(stdout, /PCR 0 sha256: +0{64}/);
  await t.rejects(vtpm('hw', 'info', '--hw', 'floppy', '--state-dir', dir), { code: 1, stderr: /--hw must be "tis" or "device:PATH"/ });
  await t.rejects(vtpm('hw', 'info', '--hw', `device:${path.join(dir, 'missing')}`), { code: 1, stderr: /cannot open .*missing: ENOENT/ });
});
