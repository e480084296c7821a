// The resource manager against a real libtpms engine (no FUSE): spaces, virtual handles,
// sessions kept across commands, the kernel's refusals and their errnos, flush on close.
// (libtpms keeps global state: one engine per process, shared by every test here.)
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import * as tpm2 from '../../drivers/tpm/tpm2.ts';
import { buildCommand } from '../../drivers/tpm/command.ts';
import { CommandAttributes } from '../../drivers/tpmrm/command-attributes.ts';
import { SAVED } from '../../drivers/tpmrm/constants.ts';
import { ResourceManager } from '../../drivers/tpmrm/resource-manager.ts';
import {
  contextSaveCommand,
  flushCommand,
  listHandles,
  LOADED_SESSION,
  rcOf,
  SAVED_SESSION,
  signCommand,
  signingKey,
  signVerifies,
  spaceClient,
  startEngine,
  TRANSIENT,
  WriteFailed,
} from './support.ts';

const transport = startEngine();
t.teardown(() => transport.close());
const direct = (cmd: Uint8Array) => transport.transmitSync(cmd, 0).slice();
const rm = ResourceManager.detect(transport)!;
const EINVAL = 22;

/** What the TPM itself holds, seen without a space: nothing between commands. */
function tpmHolds(): { transient: number[]; loadedSessions: number[]; savedSessions: number[] } {
  return { transient: listHandles(direct, TRANSIENT), loadedSessions: listHandles(direct, LOADED_SESSION), savedSessions: listHandles(direct, SAVED_SESSION) };
}

t.test('the command table comes from the TPM, with the kernel\'s ContextSave/FlushContext fix-up', async (t) => {
  t.ok(rm, 'a TPM 2.0 gets a resource manager');
  t.ok(rm.attributes.size > 80, `TPM lists ${rm.attributes.size} commands`);
  const a = (cc: number) => rm.attributes.lookup(cc);
  t.equal(CommandAttributes.handles(a(tpm2.TPM_CC.GetRandom)), 0);
  t.equal(CommandAttributes.handles(a(tpm2.TPM_CC.Sign)), 1);
  t.equal(CommandAttributes.handles(a(tpm2.TPM_CC.FlushContext)), 1, 'FlushContext counted as one handle');
  t.equal(CommandAttributes.handles(a(tpm2.TPM_CC.ContextSave)), 1);
  t.ok(CommandAttributes.returnsHandle(a(tpm2.TPM_CC.CreatePrimary)), 'CreatePrimary returns a handle');
  t.notOk(CommandAttributes.returnsHandle(a(tpm2.TPM_CC.Sign)));
  t.equal(a(0x20000000 | tpm2.TPM_CC.GetRandom), -1, 'a vendor code never matches');
});

t.test('two spaces: same virtual handle, own keys, every signature verifies, nothing left loaded', async (t) => {
  const sa = rm.openSpace();
  const sb = rm.openSpace();
  const a = spaceClient(rm, sa);
  const b = spaceClient(rm, sb);
  const ka = await signingKey(a);
  const kb = await signingKey(b);
  t.equal(ka.handle, 0x80ffffff, 'first object of space A is 0x80ffffff');
  t.equal(kb.handle, 0x80ffffff, 'first object of space B is 0x80ffffff too');
  t.not(Buffer.from(ka.name).toString('hex'), Buffer.from(kb.name).toString('hex'), 'different keys');
  t.same(tpmHolds().transient, [], 'between commands the TPM holds no object');
  for (let i = 0; i < 5; i++) {
    const msg = randomBytes(40);
    t.ok(await signVerifies(a, ka, msg), `A sign ${i} verifies with A's key`);
    t.ok(await signVerifies(b, kb, msg), `B sign ${i} verifies with B's key`);
  }
  const seen = await a.getCapability(tpm2.TPM_CAP_HANDLES, TRANSIENT, 16);
  t.same(seen.list, [0x80ffffff], 'GetCapability through A lists only A\'s object, virtual');
  const fresh = spaceClient(rm, rm.openSpace());
  t.same((await fresh.getCapability(tpm2.TPM_CAP_HANDLES, TRANSIENT, 16)).list, [], 'a fresh space sees none');
  rm.closeSpace(sa);
  rm.closeSpace(sb);
});

t.test('HMAC sessions survive across commands; closing a space flushes them', async (t) => {
  const sa = rm.openSpace();
  const sb = rm.openSpace();
  const a = spaceClient(rm, sa);
  const b = spaceClient(rm, sb);
  const ha = await a.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
  const hb = await b.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
  t.not(ha.handle, hb.handle, 'sessions keep their TPM handles (not virtualised), distinct');
  t.equal(sa.table.sessions[0], ha.handle, 'A\'s table holds its session');
  const ka = await signingKey(a, ha);
  const kb = await signingKey(b, hb);
  for (let i = 0; i < 5; i++) {
    t.ok(await signVerifies(a, ka, randomBytes(20), ha), `A signs with its session (${i})`);
    t.ok(await signVerifies(b, kb, randomBytes(20), hb), `B signs with its session (${i})`);
  }
  const held = tpmHolds();
  t.same(held.loadedSessions, [], 'no session loaded between commands');
  t.ok(held.savedSessions.includes(ha.handle) && held.savedSessions.includes(hb.handle), 'both sessions saved in the TPM');
  rm.closeSpace(sa);
  rm.closeSpace(sb);
  const after = tpmHolds();
  t.same(after, { transient: [], loadedSessions: [], savedSessions: [] }, 'closing flushed both sessions');
});

t.test('handles not in the space are refused with EINVAL; a TPM error stays a TPM response', async (t) => {
  const sa = rm.openSpace();
  const sb = rm.openSpace();
  const a = spaceClient(rm, sa);
  await signingKey(a);
  t.equal(rm.execute(sb, signCommand(0x80ffffff)), -EINVAL, 'B naming A\'s virtual handle: EINVAL');
  t.equal(rm.execute(sa, signCommand(0x80fffffe)), -EINVAL, 'an empty slot: EINVAL');
  t.equal(rm.execute(sa, signCommand(0x80000000)), -EINVAL, 'a raw TPM transient handle: EINVAL');
  t.equal(rm.execute(sb, flushCommand(0x80ffffff)), -EINVAL, 'FlushContext of a handle not in the space: EINVAL');
  t.equal(rm.execute(sb, contextSaveCommand(0x80ffffff)), -EINVAL, 'ContextSave of a handle not in the space: EINVAL');
  const persistent = rm.execute(sb, signCommand(0x81000999));
  t.type(persistent, Uint8Array, 'an unknown persistent handle goes to the TPM');
  t.equal(rcOf(persistent as Uint8Array) & 0xff, 0x8b, `TPM_RC_HANDLE (0x${rcOf(persistent as Uint8Array).toString(16)})`);
  t.same(sa.table.objects[0], SAVED, 'A\'s object untouched by B\'s attempts');
  rm.closeSpace(sa);
  rm.closeSpace(sb);
});

t.test('unknown command: the kernel\'s synthesized TPM_RC_COMMAND_CODE | RESMGR_TPM layer', async (t) => {
  const s = rm.openSpace();
  for (const cc of [0x7ffffff0, 0x20000000 | tpm2.TPM_CC.GetRandom, 0x11e]) {
    const r = rm.execute(s, buildCommand(tpm2.TPM_ST_NO_SESSIONS, cc, (w) => w.u16(8))) as Uint8Array;
    t.equal(r.length, 10, `0x${cc.toString(16)}: a bare header`);
    t.equal(rcOf(r), 0x000b0143, 'rc 0x000B0143');
    t.equal(Buffer.from(r).readUInt16BE(0), 0x8001);
  }
  rm.closeSpace(s);
});

t.test('truncated: fewer bytes than the command\'s handles is EINVAL', async (t) => {
  const s = rm.openSpace();
  const sign = signCommand(0x80ffffff);
  const short = sign.slice(0, 12);
  short[5] = 12;
  t.equal(rm.execute(s, short), -EINVAL, 'Sign cut inside its handle');
  t.equal(rm.execute(s, buildCommand(tpm2.TPM_ST_SESSIONS, tpm2.TPM_CC.CreatePrimary)), -EINVAL, 'CreatePrimary with no handle');
  const body = rm.execute(s, buildCommand(tpm2.TPM_ST_NO_SESSIONS, tpm2.TPM_CC.GetRandom));
  t.type(body, Uint8Array, 'GetRandom without its parameter: to the TPM');
  t.not(rcOf(body as Uint8Array), 0, 'which answers an error');
  rm.closeSpace(s);
});

t.test('FlushContext of its own object frees the slot; a session ended by the TPM is forgotten', async (t) => {
  const s = rm.openSpace();
  const c = spaceClient(rm, s);
  const k = await signingKey(c);
  await c.flushContext(k.handle);
  t.equal(s.table.objects[0], 0, 'slot free after FlushContext');
  t.equal(rm.execute(s, signCommand(k.handle)), -EINVAL, 'the virtual handle is gone');
  const h = await c.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
  await c.flushContext(h.handle);
  t.equal(s.table.sessions[0], 0, 'a flushed session is forgotten');
  t.same(tpmHolds(), { transient: [], loadedSessions: [], savedSessions: [] });
  rm.closeSpace(s);
});

t.test('a refused command flushes the space\'s sessions (as the kernel\'s tpm2_flush_space)', async (t) => {
  const s = rm.openSpace();
  const c = spaceClient(rm, s);
  const h = await c.startAuthSession({ type: TPM_SE.HMAC, symmetric: false });
  t.equal(rm.execute(s, signCommand(0x80fffffe)), -EINVAL);
  t.notOk(tpmHolds().savedSessions.includes(h.handle), 'the session is gone from the TPM');
  const k = await signingKey(c);
  t.equal(s.table.sessions[0], 0, 'and forgotten at the next command');
  await t.rejects(c.sign(k, new Uint8Array(32), h), 'using it fails at the TPM');
  rm.closeSpace(s);
});

t.test('objects beyond what the TPM can load: the TPM\'s own error, the space intact', async (t) => {
  const s = rm.openSpace();
  const c = spaceClient(rm, s);
  const keys = [];
  let refused: unknown = null;
  for (let i = 0; i < 4 && !refused; i++) {
    try {
      keys.push(await signingKey(c));
    } catch (e) {
      refused = e;
    }
  }
  t.ok(keys.length >= 2, `${keys.length} objects in one space`);
  t.ok(refused, 'a fourth object is refused');
  t.notOk(refused instanceof WriteFailed && refused.errno !== 12, `refused by the TPM or ENOMEM: ${String(refused)}`);
  for (const k of keys) t.ok(await signVerifies(c, k, randomBytes(10)), `key ${k.handle.toString(16)} still signs`);
  rm.closeSpace(s);
  t.same(tpmHolds(), { transient: [], loadedSessions: [], savedSessions: [] });
});
