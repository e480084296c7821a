// The control channel against the real client, swtpm_ioctl (swtpm-tools), and a real
// libtpms TPM 2.0 behind it: capabilities, INIT/STOP/SHUTDOWN, locality, the
// tpmEstablished bit and hashing, info, buffer size, config, cancel, STORE_VOLATILE, and
// every state blob saved from one server and loaded into a fresh one.
import t from 'tap';
import { existsSync, readFileSync, rmSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { capabilities } from '../../drivers/swtpm_ctrl/protocol.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { dataClient, ioctl, rcOf, sendRetry, serve } from './helpers.ts';
import { extend256, nvDefine, nvRead, nvWrite, parseNvRead, pcrRead256, pcrValue, sha256 } from './tpm-cmds.ts';

const work = mkdtempSync(join(tmpdir(), 'swtpm-ctrl-ioctl-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.test('TPM 2.0 through swtpm_ioctl', async (t) => {
  const s = await serve({ tpm: '2.0' });
  t.teardown(s.stop);
  const io = (...a: string[]) => ioctl(s.ctrl, ...a);

  const caps = await io('-c');
  t.equal(caps.code, 0, caps.stderr);
  t.match(caps.stdout, `ptm capability is 0x${capabilities('2.0').toString(16)}`);
  t.equal(capabilities('2.0'), 0x1ffff, 'every capability swtpm has, LOCK_STORAGE and the command header included');

  // Before INIT the TPM is off: TPM-running commands are TPM_BAD_ORDINAL, the data channel
  // answers TPM_RC_FAILURE (QEMU reads the family from that answer's tag).
  const est0 = await io('-e');
  t.not(est0.code, 0);
  t.match(est0.stderr, /0xa\b/);
  const d = await dataClient(s.data);
  t.teardown(d.close);
  const off = await d.send(tpm2.getRandom(8));
  t.equal(off.readUInt16BE(0), 0x8001, 'TPM 2.0 tag');
  t.equal(rcOf(off), 0x101, 'TPM_RC_FAILURE while stopped');

  t.equal((await io('-i')).code, 0, 'INIT');
  t.equal(rcOf(await d.send(tpm2.startup())), 0, 'Startup after INIT');
  const rnd = await d.send(tpm2.getRandom(16));
  t.equal(tpm2.parseGetRandom(rnd).length, 16);

  const info = await io('--info', '1');
  t.equal(info.code, 0, info.stderr);
  t.same(JSON.parse(info.stdout).TPMSpecification?.family, '2.0');
  const info3 = JSON.parse((await io('--info', '3')).stdout) as Record<string, unknown>;
  t.ok(info3.TPMAttributes, 'flags select the parts');

  const bs = await io('-b', '0');
  t.equal(bs.code, 0);
  t.match(bs.stdout, /TPM buffersize: 4096/);
  const bsRunning = await io('-b', '3000');
  t.not(bsRunning.code, 0, 'changing the buffer size needs a stopped TPM');
  t.match((await io('-g')).stdout, /ptm configuration flags: 0x0\b/);
  t.equal((await io('-C')).code, 0, 'CANCEL_TPM_CMD');

  // Locality reaches libtpms: its PCR 20 is resettable from locality 2 only, so
  // PCR_Reset(20) is refused at locality 0 and accepted at 2.
  const reset20 = () => d.send(buildPcrReset(20));
  t.not(rcOf(await reset20()), 0, 'PCR_Reset(20) refused at locality 0');
  t.equal((await io('-l', '2')).code, 0);
  { const rr = await reset20(); t.equal(rcOf(rr), 0, `PCR_Reset(20) at locality 2: ${rr.toString('hex')}`); }
  t.equal((await io('-l', '0')).code, 0);

  // The established bit: clear at first; HASH_START..END sets it (and measures into PCR 17);
  // only localities 3 and 4 may reset it.
  t.match((await io('-e')).stdout, /tpmEstablished is 0/);
  const pcr17before = pcrValue(await d.send(pcrRead256(17)));
  const hashed = await io('-h', 'measured by the platform');
  t.equal(hashed.code, 0, hashed.stderr);
  t.match((await io('-e')).stdout, /tpmEstablished is 1/);
  const pcr17 = pcrValue(await d.send(pcrRead256(17)));
  t.notSame(pcr17, pcr17before, 'HASH_START/DATA/END extended PCR 17');
  t.same(pcr17, sha256(Buffer.alloc(32), sha256(Buffer.from('measured by the platform'))), 'PCR 17 = H(0 || H(data))');
  const r0 = await io('-r', '0');
  t.not(r0.code, 0);
  t.match(r0.stderr, /0x3d/, 'TPM_BAD_LOCALITY from locality 0');
  t.equal((await io('-r', '3')).code, 0);
  t.match((await io('-e')).stdout, /tpmEstablished is 0/);

  // State a guest would leave: a PCR extended, an NV index written.
  const digest = sha256(Buffer.from('guest measurement'));
  t.equal(rcOf(await d.send(extend256(16, digest))), 0);
  const pcr16 = pcrValue(await d.send(pcrRead256(16)));
  t.same(pcr16, sha256(Buffer.alloc(32), digest));
  t.equal(rcOf(await d.send(nvDefine(8))), 0, 'NV_DefineSpace');
  { const w = await sendRetry(d, nvWrite(Buffer.from('vtpm-nv!'))); t.equal(rcOf(w), 0, `NV_Write ${w.toString('hex')}`); }

  // STORE_VOLATILE writes the volatile blob into the state store.
  t.equal((await io('-v')).code, 0);
  t.ok(existsSync(join(s.state, 'volatilestate')), 'volatile state stored');

  const files = { permanent: join(work, 'perm'), volatile: join(work, 'vol'), savestate: join(work, 'save') };
  for (const [type, f] of Object.entries(files)) {
    const r = await io('--save', type, f);
    t.equal(r.code, 0, `--save ${type}: ${r.stderr}`);
  }
  t.ok(readFileSync(files.permanent).length > 1000, 'permanent blob');
  t.ok(readFileSync(files.volatile).length > 4000, 'volatile blob (larger than one 3 KiB chunk)');
  t.equal(readFileSync(files.savestate).length, 0, 'TPM 2.0 has no savestate blob (empty, as swtpm)');
  t.notOk(existsSync(join(s.state, 'volatilestate')), 'handing out the volatile blob removes the stored one (as swtpm)');

  t.equal((await io('--stop')).code, 0);
  t.equal(rcOf(await d.send(tpm2.getRandom(8))), 0x101, 'stopped again');
  t.not((await io('-e')).code, 0);
  const loadRunning = await io('--load', 'permanent', files.permanent);
  t.equal(loadRunning.code, 0, 'SET_STATEBLOB while stopped is fine');

  // A fresh server with an empty state dir takes the blobs and resumes where the first was.
  const s2 = await serve({ tpm: '2.0' });
  t.teardown(s2.stop);
  const io2 = (...a: string[]) => ioctl(s2.ctrl, ...a);
  t.equal((await io2('-i')).code, 0);
  const running = await io2('--load', 'permanent', files.permanent);
  t.not(running.code, 0, 'SET_STATEBLOB refused while running');
  t.match(running.stderr, /0xa\b/);
  t.equal((await io2('--stop')).code, 0);
  for (const type of ['permanent', 'volatile'] as const) {
    const r = await io2('--load', type, files[type]);
    t.equal(r.code, 0, `--load ${type}: ${r.stderr}`);
  }
  t.equal((await io2('-i')).code, 0, 'INIT resumes the loaded state');
  const d2 = await dataClient(s2.data);
  t.teardown(d2.close);
  t.same(pcrValue(await d2.send(pcrRead256(16))), pcr16, 'PCR 16 came along in the volatile blob (no Startup needed)');
  const nv = await d2.send(nvRead(8));
  t.equal(rcOf(nv), 0);
  t.same(parseNvRead(nv), Buffer.from('vtpm-nv!'), 'NV index came along in the permanent blob');

  // SHUTDOWN ends the server (as swtpm exits).
  t.equal((await io2('-s')).code, 0);
  t.equal(await s2.exited, 0, 'server exits 0 after SHUTDOWN');
});

t.test('TPM 1.2: capabilities, savestate blob round trip', async (t) => {
  const s = await serve({ tpm: '1.2', args: ['--startup-clear'] });
  t.teardown(s.stop);
  const io = (...a: string[]) => ioctl(s.ctrl, ...a);
  t.match((await io('-c')).stdout, `ptm capability is 0x${capabilities('1.2').toString(16)}`);
  t.equal((await io('-i')).code, 0);
  const d = await dataClient(s.data);
  t.teardown(d.close);
  const { saveState } = await import('../../drivers/tpm/tpm12.ts');
  t.equal(rcOf(await d.send(saveState())), 0, 'TPM_SaveState');
  const f = join(work, 'save12');
  t.equal((await io('--save', 'savestate', f)).code, 0);
  const blob = readFileSync(f);
  t.ok(blob.length > 100, `TPM 1.2 savestate blob (${blob.length} bytes)`);
  t.equal((await io('--stop')).code, 0);
  t.equal((await io('--load', 'savestate', f)).code, 0);
  t.ok(existsSync(join(s.state, 'savestate')), 'SET_STATEBLOB(savestate) wrote the store');
});

/** TPM2_PCR_Reset(pcr) with an empty password. */
function buildPcrReset(pcr: number): Uint8Array {
  return tpm2Command(0x13d, (w) => {
    w.u32(pcr);
    tpm2.writePasswordAuth(w);
  });
}

import { buildCommand } from '../../drivers/tpm/command.ts';
import type { Writer } from '../../drivers/tpm/marshal.ts';
function tpm2Command(cc: number, body: (w: Writer) => void): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, cc, body);
}
