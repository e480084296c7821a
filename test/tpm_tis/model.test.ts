// The TIS register file, register by register, with the real emulated chip behind it.
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { Writer } from '../../drivers/tpm/marshal.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { TPM_ALG } from '../../drivers/tpm/tpm2-structures.ts';
import { startEmulatedTpmChip } from '../../drivers/hwtpm/open.ts';
import type { TisModel } from '../../drivers/tpm_tis/model.ts';
import { ACCESS, DID_VID_VALUE, INT, INTERFACE_ID_VALUE, INTF_CAPABILITY_VALUE, REG, RID_VALUE, STS } from '../../drivers/tpm_tis/regs.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vtpm-tis-model-'));
let m: TisModel;
t.before(async () => {
  m = await startEmulatedTpmChip({ stateDir: dir });
  // What the firmware does at boot; then the registers are back at their reset values.
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  const r = await run(tpm2.startup());
  if (r[9] !== 0) throw new Error('Startup failed');
  m.write8(L(0, REG.STS), STS.commandReady);
  m.write32(L(0, REG.INT_ENABLE), 0);
  m.write32(L(0, REG.INT_STATUS), 0xffffffff);
  m.write8(L(0, REG.ACCESS), ACCESS.activeLocality);
});
t.teardown(async () => {
  await m?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const L = (loc: number, reg: number) => loc * 0x1000 + reg;
const sts = (loc = 0) => m.read32(L(loc, REG.STS));
const burst = (loc = 0) => (sts(loc) >>> 8) & 0xffff;
const access = (loc: number) => m.read8(L(loc, REG.ACCESS));

function release(loc: number): void {
  if (access(loc) & ACCESS.activeLocality) m.write8(L(loc, REG.ACCESS), ACCESS.activeLocality);
}

/** Write a whole command at `loc` (locality already held), go, wait for dataAvail, read. */
async function run(cmd: Uint8Array, loc = 0): Promise<Uint8Array> {
  m.write8(L(loc, REG.STS), STS.commandReady);
  m.writeBytes(L(loc, REG.DATA_FIFO), cmd);
  m.write8(L(loc, REG.STS), STS.tpmGo);
  m.write32(L(loc, REG.INT_ENABLE), (INT.globalEnable | INT.dataAvail) >>> 0);
  const deadline = Date.now() + 30_000;
  while (!(sts(loc) & STS.dataAvail)) {
    if (Date.now() > deadline) throw new Error('no dataAvail');
    await m.irq.wait(deadline - Date.now());
    m.write32(L(loc, REG.INT_STATUS), m.read32(L(loc, REG.INT_STATUS)));
  }
  const out = new Uint8Array(((sts(loc) >>> 8) & 0xffff) + 4096);
  let n = 0;
  while (sts(loc) & STS.dataAvail) out[n++] = m.read8(L(loc, REG.DATA_FIFO));
  return out.slice(0, n);
}

const rsaPrimary = () =>
  buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.CreatePrimary, (w) => {
    w.u32(tpm2.TPM_RH_OWNER);
    tpm2.writePasswordAuth(w);
    w.sized16(new Writer(4).u16(0).u16(0).finish());
    const p = new Writer(64).u16(TPM_ALG.RSA).u16(TPM_ALG.SHA256).u32(0x30072).sized16(new Uint8Array(0));
    p.u16(TPM_ALG.AES).u16(128).u16(TPM_ALG.CFB).u16(TPM_ALG.NULL).u16(2048).u32(0).sized16(new Uint8Array(0));
    w.sized16(p.finish()).sized16(new Uint8Array(0)).u32(0);
  });

t.test('identity registers', async (t) => {
  for (let loc = 0; loc < 5; loc++) {
    t.equal(m.read32(L(loc, REG.DID_VID)), DID_VID_VALUE, `DID_VID at locality ${loc}`);
    t.equal(m.read8(L(loc, REG.RID)), RID_VALUE);
    t.equal(m.read32(L(loc, REG.INTERFACE_ID)), INTERFACE_ID_VALUE);
    t.equal(m.read32(L(loc, REG.INTF_CAPABILITY)), INTF_CAPABILITY_VALUE);
  }
  t.equal(m.read16(L(0, REG.DID_VID)), 0x1014, 'vendor id in the low half');
  t.equal(m.read16(L(0, REG.DID_VID + 2)), 0x0001, 'device id in the high half');
  t.equal(INTERFACE_ID_VALUE & 0xf, 0, 'FIFO interface for TPM 2.0');
  t.equal(m.read32(0x5000), 0xffffffff, 'beyond locality 4 floats high');
});

t.test('ACCESS after reset, requestUse, pendingRequest, seize, beenSeized, relinquish', async (t) => {
  for (let loc = 0; loc < 5; loc++) t.equal(access(loc), ACCESS.tpmRegValidSts | ACCESS.tpmEstablishment, `locality ${loc} idle after reset`);
  t.equal(sts(0), 0xffffffff, 'STS of a locality that is not active floats high');

  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  t.equal(access(0), ACCESS.tpmRegValidSts | ACCESS.activeLocality | ACCESS.tpmEstablishment, 'requestUse grants a free TPM');
  t.not(sts(0), 0xffffffff, 'STS answers the active locality');

  m.write8(L(2, REG.ACCESS), ACCESS.requestUse);
  t.equal(access(2) & (ACCESS.requestUse | ACCESS.activeLocality), ACCESS.requestUse, 'locality 2 waits with requestUse set');
  t.ok(access(0) & ACCESS.pendingRequest, 'the active locality sees pendingRequest');
  t.notOk(access(2) & ACCESS.pendingRequest, 'a requester does not see its own request as pending');

  m.write8(L(3, REG.ACCESS), ACCESS.seize);
  t.ok(access(3) & ACCESS.activeLocality, 'locality 3 seizes from 0');
  t.notOk(access(0) & ACCESS.activeLocality, 'locality 0 lost it');
  t.ok(access(0) & ACCESS.beenSeized, 'and sees beenSeized');

  m.write8(L(1, REG.ACCESS), ACCESS.seize);
  t.ok(access(3) & ACCESS.activeLocality, 'a lower locality cannot seize');
  t.notOk(access(1) & ACCESS.activeLocality);

  m.write8(L(3, REG.ACCESS), ACCESS.activeLocality);
  t.ok(access(2) & ACCESS.activeLocality, 'relinquish hands the TPM to the pending request');
  t.notOk(access(2) & ACCESS.requestUse, 'whose request is then done');
  t.notOk(access(3) & ACCESS.activeLocality);

  m.write8(L(0, REG.ACCESS), ACCESS.beenSeized);
  t.notOk(access(0) & ACCESS.beenSeized, 'beenSeized clears by writing 1');
  m.write8(L(2, REG.ACCESS), ACCESS.activeLocality);
  for (let loc = 0; loc < 5; loc++) t.notOk(access(loc) & ACCESS.activeLocality, `locality ${loc} not active after release`);
});

t.test('writes from a locality that is not active are ignored', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  const before = sts(0);
  m.write8(L(1, REG.STS), STS.commandReady);
  t.equal(sts(0), before, 'commandReady from locality 1 did nothing');
  t.notOk(sts(0) & STS.commandReady);
  m.write32(L(1, REG.INT_ENABLE), 0x80000087);
  t.equal(m.read32(L(1, REG.INT_ENABLE)), 0, 'INT_ENABLE of an inactive locality stays 0');
  m.write8(L(0, REG.STS), STS.commandReady);
  m.writeBytes(L(1, REG.DATA_FIFO), tpm2.getRandom(8));
  t.ok(sts(0) & STS.commandReady, 'FIFO writes from locality 1 did not start a reception at 0');
  m.write8(L(1, REG.ACCESS), ACCESS.activeLocality);
  t.ok(access(0) & ACCESS.activeLocality, 'locality 1 cannot relinquish what 0 holds');
  release(0);
});

t.test('burstCount, Expect until the header size, tpmGo, dataAvail until drained', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  m.writeBytes(L(0, REG.DATA_FIFO), tpm2.getRandom(8));
  t.notOk(sts() & STS.expect, 'a FIFO write in idle is ignored: no reception started');
  m.write8(L(0, REG.STS), STS.commandReady);
  t.ok(sts() & STS.commandReady, 'commandReady: ready');
  t.ok(burst() > 0, 'burstCount > 0 when ready');
  const cmd = tpm2.getRandom(8);
  for (let i = 0; i < cmd.length; i++) {
    m.write8(L(0, REG.DATA_FIFO), cmd[i]!);
    if (i < cmd.length - 1) {
      t.ok(sts() & STS.expect, `Expect after byte ${i + 1} of ${cmd.length}`);
      t.ok(burst() > 0, 'burstCount > 0 while data may be written');
    }
  }
  t.notOk(sts() & STS.expect, 'Expect drops when the header size is reached');
  t.equal(m.read16(L(0, REG.STS + 1)), burst(), 'burstCount read as STS+1 (16 bits)');
  m.write8(L(0, REG.DATA_FIFO), 0x55);
  m.write8(L(0, REG.STS), STS.tpmGo);
  const deadline = Date.now() + 5000;
  while (!(sts() & STS.dataAvail) && Date.now() < deadline) await m.irq.wait(100);
  t.ok(sts() & STS.dataAvail, 'dataAvail after tpmGo');
  m.write8(L(0, REG.DATA_FIFO), 0x55); // a FIFO write in completion is ignored
  const resp: number[] = [];
  while (sts() & STS.dataAvail) resp.push(m.read8(L(0, REG.DATA_FIFO)));
  t.equal(resp.length, 10 + 2 + 8, 'the extra byte was ignored: a good GetRandom(8) response');
  t.same(resp.slice(6, 10), [0, 0, 0, 0], 'TPM_RC_SUCCESS');
  t.notOk(sts() & STS.dataAvail, 'dataAvail dropped when drained');
  t.equal(m.read8(L(0, REG.DATA_FIFO)), 0xff, 'an empty FIFO reads 0xff');
  m.write8(L(0, REG.STS), STS.responseRetry);
  t.ok(sts() & STS.dataAvail, 'responseRetry rewinds the response');
  t.equal(m.read32(L(0, REG.DATA_FIFO)), resp[0]! | (resp[1]! << 8) | (resp[2]! << 16) | ((resp[3]! << 24) >>> 0), '32-bit FIFO reads, little-endian');
  m.write8(L(0, REG.STS), STS.commandReady);
  t.ok(sts() & STS.commandReady, 'commandReady after completion: ready again');
  t.notOk(sts() & STS.dataAvail);
  release(0);
});

t.test('a command whose size field is larger keeps Expect until that size', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  m.write8(L(0, REG.STS), STS.commandReady);
  const cmd = tpm2.getRandom(8).slice();
  cmd[5] = 20; // claims 20 bytes, 12 are written
  m.writeBytes(L(0, REG.DATA_FIFO), cmd);
  t.ok(sts() & STS.expect, 'still expecting 8 more bytes');
  m.write8(L(0, REG.STS), STS.tpmGo);
  t.notOk(sts() & STS.dataAvail, 'tpmGo ignored while Expect is set');
  t.ok(sts() & STS.expect, 'still in reception');
  release(0);
});

t.test('commandReady during reception aborts it', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  m.write8(L(0, REG.STS), STS.commandReady);
  m.writeBytes(L(0, REG.DATA_FIFO), tpm2.getRandom(8).subarray(0, 7));
  t.ok(sts() & STS.expect, 'in reception');
  m.write8(L(0, REG.STS), STS.commandReady);
  t.ok(sts() & STS.commandReady, 'aborted: ready');
  t.notOk(sts() & STS.expect, 'no partial command left');
  const resp = await run(tpm2.getRandom(4));
  t.equal(resp.length, 16, 'the next command runs whole');
  release(0);
});

t.test('register reads answer while the chip executes; commandReady during execution aborts', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  m.write8(L(0, REG.STS), STS.commandReady);
  m.writeBytes(L(0, REG.DATA_FIFO), rsaPrimary());
  m.write8(L(0, REG.STS), STS.tpmGo);
  // The RSA key generation runs in the chip's thread: count STS reads and event-loop turns.
  let reads = 0;
  let ticks = 0;
  let worst = 0n;
  const t0 = Date.now();
  while (!(sts() & STS.dataAvail) && Date.now() - t0 < 30_000) {
    const a = process.hrtime.bigint();
    const s = sts();
    const d = process.hrtime.bigint() - a;
    if (d > worst) worst = d;
    t.equal(s & (STS.stsValid | STS.commandReady | STS.expect), STS.stsValid, 'execution: valid, not ready, not expecting');
    reads++;
    await new Promise((r) => setImmediate(r));
    ticks++;
    if (reads >= 20) break;
  }
  t.equal(reads, 20, `20 STS reads during CreatePrimary(RSA-2048) (worst ${Number(worst) / 1000} µs)`);
  t.ok(worst < 5_000_000n, 'no read waited on the chip');
  t.equal(ticks, reads, 'the event loop kept turning');
  m.write8(L(0, REG.STS), STS.commandReady);
  t.notOk(sts() & STS.dataAvail, 'aborted: no dataAvail');
  const deadline = Date.now() + 60_000;
  while (!(sts() & STS.commandReady) && Date.now() < deadline) await m.irq.wait(50);
  t.ok(sts() & STS.commandReady, 'ready once the chip stopped');
  t.notOk(sts() & STS.dataAvail, 'the aborted command left no response');
  const r = await run(tpm2.getRandom(8));
  t.equal(r.length, 20, 'the next response is the next command\'s, not the aborted one');
  release(0);
});

t.test('XDATA_FIFO carries the same FIFO; INT_VECTOR keeps its SIRQ number', async (t) => {
  m.write8(L(1, REG.ACCESS), ACCESS.requestUse);
  m.write8(L(1, REG.INT_VECTOR), 0x0b);
  t.equal(m.read8(L(1, REG.INT_VECTOR)), 0x0b);
  m.write8(L(1, REG.STS), STS.commandReady);
  const cmd = tpm2.getRandom(4);
  for (let i = 0; i < cmd.length; i += 4) m.write32(L(1, REG.XDATA_FIFO), cmd[i]! | (cmd[i + 1]! << 8) | (cmd[i + 2]! << 16) | (cmd[i + 3]! << 24));
  t.notOk(sts(1) & STS.expect, '12 bytes in three 32-bit XDATA writes');
  m.write8(L(1, REG.STS), STS.tpmGo);
  const deadline = Date.now() + 5000;
  while (!(sts(1) & STS.dataAvail) && Date.now() < deadline) await m.irq.wait(50);
  const out = new Uint8Array(16);
  m.readBytes(L(1, REG.XDATA_FIFO), out);
  t.same(out.subarray(6, 10), new Uint8Array(4), 'TPM_RC_SUCCESS read through XDATA_FIFO');
  t.notOk(sts(1) & STS.dataAvail, 'drained');
  m.write8(L(1, REG.STS), STS.commandReady);
  release(1);
});

t.test('interrupts: dataAvail raises the line, INT_STATUS clears by writing 1', async (t) => {
  m.write8(L(0, REG.ACCESS), ACCESS.requestUse);
  m.write32(L(0, REG.INT_ENABLE), (INT.globalEnable | INT.dataAvail) >>> 0);
  m.write32(L(0, REG.INT_STATUS), 0xffffffff);
  t.equal(m.read32(L(0, REG.INT_STATUS)), 0, 'cleared');
  t.equal(await m.irq.wait(20), false, 'line low with nothing pending');
  m.write8(L(0, REG.STS), STS.commandReady);
  m.writeBytes(L(0, REG.DATA_FIFO), tpm2.getRandom(8));
  m.write8(L(0, REG.STS), STS.tpmGo);
  t.equal(await m.irq.wait(5000), true, 'the line rises when the response is there');
  t.ok(m.read32(L(0, REG.INT_STATUS)) & INT.dataAvail, 'INT_STATUS says dataAvail');
  m.write32(L(0, REG.INT_STATUS), INT.dataAvail);
  t.notOk(m.read32(L(0, REG.INT_STATUS)) & INT.dataAvail, 'write 1 to clear');
  m.write32(L(0, REG.INT_ENABLE), 0);
  m.write8(L(0, REG.STS), STS.commandReady);
  release(0);
});
