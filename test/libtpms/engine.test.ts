// The libtpms engine, through the real library: both TPM families, state, bad input.
import t from 'tap';
import { createHash } from 'node:crypto';
import { buildCommand, parseResponse } from '../../drivers/tpm/command.ts';
import { MemoryStateStore } from '../../drivers/tpm/engine.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import * as tpm12 from '../../drivers/tpm/tpm12.ts';
import { LibtpmsEngine } from '../../drivers/libtpms/libtpms-engine.ts';

const sha256 = (...b: Uint8Array[]) => createHash('sha256').update(Buffer.concat(b)).digest();
const sha1 = (...b: Uint8Array[]) => createHash('sha1').update(Buffer.concat(b)).digest();
const rcOf = (resp: Uint8Array) => Buffer.from(resp).readUInt32BE(6);

// TPM2 NV index commands, built here from the command framing (owner auth is empty).
const NV_INDEX = 0x01500016;
function nvDefine(size: number): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_DefineSpace, (w) => {
    w.u32(tpm2.TPM_RH_OWNER);
    tpm2.writePasswordAuth(w);
    w.sized16(new Uint8Array(0)); // auth
    const pub = w.mark16();
    const start = w.length;
    // TPMS_NV_PUBLIC: index, nameAlg, attributes (OWNERWRITE|OWNERREAD|AUTHREAD|AUTHWRITE), policy, size
    w.u32(NV_INDEX).u16(tpm2.TPM_ALG_SHA256).u32(0x00060006).sized16(new Uint8Array(0)).u16(size);
    w.patch16(pub, w.length - start);
  });
}
function nvWrite(data: Uint8Array): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_Write, (w) => {
    w.u32(NV_INDEX).u32(NV_INDEX);
    tpm2.writePasswordAuth(w);
    w.sized16(data).u16(0);
  });
}
function nvRead(size: number): Uint8Array {
  return buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.NV_Read, (w) => {
    w.u32(NV_INDEX).u32(NV_INDEX);
    tpm2.writePasswordAuth(w);
    w.u16(size).u16(0);
  });
}
function parseNvRead(resp: Uint8Array): Uint8Array {
  const r = parseResponse(resp, '2.0').body;
  r.u32('parameterSize');
  return r.sized16('data').slice();
}
// libtpms (and so swtpm) answers some first NV accesses with TPM_RC_RETRY: the command
// did not run and a TSS resends it, as here.
function withRetry(e: LibtpmsEngine, cmd: Uint8Array): Uint8Array {
  let resp = e.process(cmd);
  for (let i = 0; i < 3 && rcOf(resp) === 0x922; i++) resp = e.process(cmd);
  return resp;
}
const pcr16 = (e: LibtpmsEngine) =>
  tpm2.parsePcrRead(e.process(tpm2.pcrRead([{ alg: tpm2.TPM_ALG_SHA256, pcrs: [16] }]))).digests[0]!;

t.test('TPM 2.0: startup, random, PCR extend checked against SHA-256', async (t) => {
  const e = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  t.teardown(() => e.terminate());
  t.equal(rcOf(e.process(tpm2.getRandom(16))), 0x100, 'a fresh TPM wants Startup first (TPM_RC_INITIALIZE)');
  parseResponse(e.process(tpm2.startup()), '2.0');
  const r1 = tpm2.parseGetRandom(e.process(tpm2.getRandom(16)));
  const r2 = tpm2.parseGetRandom(e.process(tpm2.getRandom(16)));
  t.equal(r1.length, 16);
  t.not(Buffer.from(r1).toString('hex'), Buffer.from(r2).toString('hex'), 'two draws differ');
  const before = pcr16(e);
  t.same([...before], [...new Uint8Array(32)], 'PCR 16 starts at zero');
  const digest = sha256(Buffer.from('measured thing'));
  tpm2.parsePcrExtend(e.process(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest }])));
  t.equal(Buffer.from(pcr16(e)).toString('hex'), sha256(before, digest).toString('hex'));
  const caps = tpm2.parseGetCapability(e.process(tpm2.getCapability(tpm2.TPM_CAP_PCRS, 0, 1)));
  t.ok(caps.pcrs?.some((b) => b.alg === tpm2.TPM_ALG_SHA256 && b.pcrs.length === 24), 'a full SHA-256 bank');
  t.match(e.info(), { TPMSpecification: { family: '2.0' } });
});

t.test('TPM 1.2: startup, random, extend + PCRRead checked against SHA-1', async (t) => {
  const e = new LibtpmsEngine({ version: '1.2', store: new MemoryStateStore() });
  t.teardown(() => e.terminate());
  parseResponse(e.process(tpm12.startup()), '1.2');
  t.equal(tpm12.parseGetRandom(e.process(tpm12.getRandom(16))).length, 16);
  const before = tpm12.parsePcrRead(e.process(tpm12.pcrRead(10)));
  const digest = sha1(Buffer.from('measured thing'));
  const out = tpm12.parseExtend(e.process(tpm12.extend(10, digest)));
  const expected = sha1(before, digest).toString('hex');
  t.equal(Buffer.from(out).toString('hex'), expected, 'TPM_Extend returns the new value');
  t.equal(Buffer.from(tpm12.parsePcrRead(e.process(tpm12.pcrRead(10)))).toString('hex'), expected);
  const ver = tpm12.parseVersionInfo(tpm12.parseGetCapability(e.process(tpm12.getCapability(tpm12.TPM_CAP_VERSION_VAL))));
  t.match(ver.version, /^1\.2 /);
});

t.test('NV data persists through the store across terminate and re-init', async (t) => {
  const store = new MemoryStateStore();
  const data = Buffer.from('persist me across restarts');
  let e = new LibtpmsEngine({ version: '2.0', store });
  try {
    parseResponse(e.process(tpm2.startup()), '2.0');
    parseResponse(e.process(nvDefine(data.length)), '2.0');
    parseResponse(withRetry(e, nvWrite(data)), '2.0');
    t.ok(store.blobs.get('permall')?.length, 'libtpms wrote its permanent blob to the store');
  } finally {
    e.terminate();
  }
  e = new LibtpmsEngine({ version: '2.0', store });
  t.teardown(() => e.terminate());
  parseResponse(e.process(tpm2.startup()), '2.0');
  t.equal(Buffer.from(parseNvRead(withRetry(e, nvRead(data.length)))).toString(), data.toString());
});

t.test('volatile state GetState/SetState round trip keeps PCRs', async (t) => {
  const store = new MemoryStateStore();
  let e = new LibtpmsEngine({ version: '2.0', store });
  let perm: Uint8Array | undefined;
  let vol: Uint8Array | undefined;
  let value: Uint8Array;
  try {
    parseResponse(e.process(tpm2.startup()), '2.0');
    tpm2.parsePcrExtend(e.process(tpm2.pcrExtend(16, [{ alg: tpm2.TPM_ALG_SHA256, digest: sha256(Buffer.from('x')) }])));
    value = pcr16(e);
    perm = e.getState('permanent');
    vol = e.getState('volatile');
  } finally {
    e.terminate();
  }
  t.ok(perm && perm.length > 100, `permanent blob (${perm?.length} bytes)`);
  t.ok(vol && vol.length > 100, `volatile blob (${vol?.length} bytes)`);
  e = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore(), deferStart: true });
  t.teardown(() => e.terminate());
  e.setState('permanent', perm!);
  e.setState('volatile', vol!);
  e.start();
  t.equal(Buffer.from(pcr16(e)).toString('hex'), Buffer.from(value).toString('hex'), 'PCR 16 restored without Startup');
  t.throws(() => e.setState('volatile', vol!), { code: 'EENGINE' }, 'setState refused while running');
});

t.test('bad input gives TPM error responses, a second engine is refused', async (t) => {
  const e = new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() });
  t.teardown(() => e.terminate());
  parseResponse(e.process(tpm2.startup()), '2.0');
  const good = tpm2.getRandom(8);
  const wrongSize = good.slice();
  wrongSize[5] = 200;
  const cases: [string, Uint8Array][] = [
    ['0 bytes', new Uint8Array(0)],
    ['truncated header', good.subarray(0, 6)],
    ['truncated body', good.subarray(0, 11)],
    ['wrong size field', wrongSize],
    ['5000 bytes', new Uint8Array(5000)],
    ['random bytes', new Uint8Array(300).map(() => (Math.random() * 256) | 0)],
  ];
  for (const [name, cmd] of cases) {
    const resp = e.process(cmd);
    t.ok(resp.length >= 10 && rcOf(resp) !== 0, `${name}: error response rc=0x${rcOf(resp).toString(16)}`);
  }
  t.equal(rcOf(e.process(new Uint8Array(4097))), 0x142, 'over 4096 bytes: TPM_RC_COMMAND_SIZE');
  t.equal(tpm2.parseGetRandom(e.process(good)).length, 8, 'still answers after bad input');
  t.throws(() => new LibtpmsEngine({ version: '2.0', store: new MemoryStateStore() }), { code: 'EENGINE' });
  const other = new LibtpmsEngine({ version: '1.2', store: new MemoryStateStore(), privateCopy: true });
  t.teardown(() => other.terminate());
  t.equal(rcOf(other.process(new Uint8Array(5000))), 25, 'TPM 1.2 oversize: TPM_BAD_PARAM_SIZE');
});

t.test('a failing state store fails the command instead of passing silently', async (t) => {
  const store = new MemoryStateStore();
  const e = new LibtpmsEngine({ version: '2.0', store });
  t.teardown(() => e.terminate());
  parseResponse(e.process(tpm2.startup()), '2.0');
  store.store = () => {
    throw new Error('disk full');
  };
  t.throws(() => e.process(nvDefine(8)), { code: 'ESTATE' });
});
