// The TPM 2.0 client the manager and attestation use, on any HardwareTpm (TIS driver, device
// node). Authorised commands take an HMAC or policy session (salted, AES-CFB parameter
// encryption where secrets travel) or fall back to a password session.
import { randomBytes } from 'node:crypto';
import { TPM_HEADER_SIZE, TpmResponseError, buildCommand, parseHeader } from './command.ts';
import { VtpmError } from '../base/errors.ts';
import { Reader, Writer } from './marshal.ts';
import { TPM_RC_INITIALIZE } from './rc.ts';
import * as tpm2 from './tpm2.ts';
import { TPM_CC, TPM_RH_NULL, TPM_RH_OWNER, TPM_RS_PW, TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS, type PcrSelection } from './tpm2.ts';
import {
  type Attest,
  type EccPoint,
  type NvPublic,
  type PublicArea,
  type Signature,
  TPMA_NV,
  TPM_ALG,
  TPM_ST_HASHCHECK,
  digestSize,
  handleName,
  hash,
  parseAttest,
  parseNvPublic,
  parsePublic,
  readSignature,
  writeNvPublic,
} from './tpm2-structures.ts';
import { AuthSession, TPMA_SESSION, TPM_SE, eccSalt, kdfa } from './tpm2-session.ts';
import type { HardwareTpm } from './transport.ts';

export const TPM_CC_EXTRA = {
  Certify: 0x148,
  ECDH_ZGen: 0x154,
  PolicyPCR: 0x17f,
  PolicyGetDigest: 0x189,
  NV_ReadPublic: 0x169,
} as const;

/** Something a command names in its handle area: handle, name, and its authValue. */
export interface Entity {
  handle: number;
  name: Uint8Array;
  authValue?: Uint8Array;
}
export interface LoadedObject extends Entity {
  public: PublicArea;
}

export function permanent(handle: number, authValue?: Uint8Array): Entity {
  return { handle, name: handleName(handle), authValue };
}

export interface Call {
  cc: number;
  handles: Entity[];
  /** Sessions for the first auths.length handles; undefined = password (entity's authValue). */
  auths: (AuthSession | undefined)[];
  params: Uint8Array;
  respHandles?: number;
  /** The first command parameter is a TPM2B with a secret: encrypt it if a session can. */
  secretIn?: boolean;
  /** The first response parameter is a TPM2B with a secret: have it encrypted. */
  secretOut?: boolean;
}
export interface Result {
  handles: number[];
  params: Reader;
}

const EMPTY = new Uint8Array(0);
const cat = (...p: Uint8Array[]) => new Uint8Array(Buffer.concat(p));

export class Tpm2Client {
  constructor(readonly tpm: HardwareTpm) {}

  /** One command, its sessions and parameter encryption (builders outside this file use it too). */
  async run(call: Call): Promise<Result> {
    const withAuth = call.auths.length > 0;
    const sessions = call.auths.filter((s): s is AuthSession => s !== undefined);
    for (const s of sessions) {
      s.rollNonce();
      s.attributes = TPMA_SESSION.continueSession;
    }
    let params = call.params;
    // Parameter encryption by the first session able to (one session carries each direction).
    const enc = sessions.find((s) => s.symmetric);
    if (enc && call.secretIn) {
      enc.attributes |= TPMA_SESSION.decrypt;
      const r = new Reader(params);
      const data = r.sized16('first parameter');
      params = cat(params.subarray(0, 2), enc.encryptCommand(data, this.authOf(call, enc)), params.subarray(2 + data.length));
    }
    if (enc && call.secretOut) enc.attributes |= TPMA_SESSION.encrypt;
    const cmd = buildCommand(withAuth ? TPM_ST_SESSIONS : TPM_ST_NO_SESSIONS, call.cc, (w) => {
      for (const h of call.handles) w.u32(h.handle);
      if (withAuth) {
        const at = w.mark32();
        const start = w.length;
        call.auths.forEach((s, i) => {
          const entity = call.handles[i]!;
          if (!s) {
            w.u32(TPM_RS_PW).sized16(EMPTY).u8(0).sized16(entity.authValue ?? EMPTY);
            return;
          }
          const cp = cpHash(s.hashAlg, call.cc, call.handles, params);
          w.u32(s.handle).sized16(s.nonceCaller).u8(s.attributes).sized16(s.commandHmac(cp, entity.authValue ?? EMPTY));
        });
        w.patch32(at, w.length - start);
      }
      w.bytes(params);
    });
    const resp = await this.tpm.transmit(cmd);
    const h = parseHeader(resp, 'response');
    if (h.code !== 0) throw new TpmResponseError(h.code, '2.0');
    const r = new Reader(resp, TPM_HEADER_SIZE);
    const handles: number[] = [];
    for (let i = 0; i < (call.respHandles ?? 0); i++) handles.push(r.u32('handle'));
    if (!withAuth) return { handles, params: r };
    const paramBytes = r.sized32('response parameters', 4096);
    for (const [i, s] of call.auths.entries()) {
      const nonce = r.sized16('nonceTPM', 64);
      const attrs = r.u8('sessionAttributes');
      const hmac = r.sized16('hmac', 64);
      if (!s) continue;
      const rp = hash(s.hashAlg, new Writer(8).u32(0).u32(call.cc).finish(), paramBytes);
      s.checkResponse(rp, nonce, attrs, hmac, call.handles[i]!.authValue ?? EMPTY);
    }
    r.expectEnd('response');
    let out = paramBytes;
    if (enc && call.secretOut) {
      const pr = new Reader(paramBytes);
      const data = pr.sized16('first response parameter');
      out = cat(paramBytes.subarray(0, 2), enc.decryptResponse(data, this.authOf(call, enc)), paramBytes.subarray(2 + data.length));
    }
    return { handles, params: new Reader(out) };
  }

  private authOf(call: Call, s: AuthSession): Uint8Array {
    const i = call.auths.indexOf(s);
    return s.isPolicy && !s.authValueNeeded ? EMPTY : (call.handles[i]?.authValue ?? EMPTY);
  }

  // --- start-up and plain commands -------------------------------------------------

  /** TPM2_Startup; false when the TPM was already started (TPM_RC_INITIALIZE). */
  async startup(clear = true): Promise<boolean> {
    try {
      await this.run({ cc: TPM_CC.Startup, handles: [], auths: [], params: new Writer(2).u16(clear ? tpm2.TPM_SU_CLEAR : tpm2.TPM_SU_STATE).finish() });
      return true;
    } catch (e) {
      if (e instanceof TpmResponseError && e.rc === TPM_RC_INITIALIZE) return false;
      throw e;
    }
  }

  async shutdown(state = true): Promise<void> {
    await this.run({ cc: TPM_CC.Shutdown, handles: [], auths: [], params: new Writer(2).u16(state ? tpm2.TPM_SU_STATE : tpm2.TPM_SU_CLEAR).finish() });
  }

  async getRandom(n: number): Promise<Uint8Array> {
    return tpm2.parseGetRandom(await this.tpm.transmit(tpm2.getRandom(n)));
  }

  async pcrRead(sel: PcrSelection[]): Promise<tpm2.PcrReadResult> {
    return tpm2.parsePcrRead(await this.tpm.transmit(tpm2.pcrRead(sel)));
  }

  async pcrExtend(pcr: number, digests: { alg: number; digest: Uint8Array }[]): Promise<void> {
    tpm2.parsePcrExtend(await this.tpm.transmit(tpm2.pcrExtend(pcr, digests)));
  }

  async getCapability(capability: number, property: number, count: number): Promise<tpm2.CapabilityResult> {
    return tpm2.parseGetCapability(await this.tpm.transmit(tpm2.getCapability(capability, property, count)));
  }

  async flushContext(handle: number): Promise<void> {
    await this.run({ cc: TPM_CC.FlushContext, handles: [], auths: [], params: new Writer(4).u32(handle).finish() });
  }

  // --- sessions and policy ----------------------------------------------------------

  /** StartAuthSession, salted with an ECC tpmKey when given, AES-128-CFB for parameters. */
  async startAuthSession(opts: { type: number; tpmKey?: LoadedObject; hashAlg?: number; symmetric?: boolean }): Promise<AuthSession> {
    const hashAlg = opts.hashAlg ?? TPM_ALG.SHA256;
    const symmetric = opts.symmetric ?? true;
    const nonceCaller = new Uint8Array(randomBytes(digestSize(hashAlg)));
    const salted = opts.tpmKey ? eccSalt(opts.tpmKey.public) : undefined;
    const w = new Writer(128).sized16(nonceCaller).sized16(salted?.encryptedSalt ?? EMPTY).u8(opts.type);
    if (symmetric) w.u16(TPM_ALG.AES).u16(128).u16(TPM_ALG.CFB);
    else w.u16(TPM_ALG.NULL);
    w.u16(hashAlg);
    const tpmKey = opts.tpmKey ?? permanent(TPM_RH_NULL);
    const res = await this.run({ cc: TPM_CC.StartAuthSession, handles: [tpmKey, permanent(TPM_RH_NULL)], auths: [], params: w.finish(), respHandles: 1 });
    const nonceTPM = res.params.sized16('nonceTPM', 64).slice();
    // Unbound: sessionKey = KDFa(salt, "ATH", nonceTPM, nonceCaller); empty when unsalted.
    const sessionKey = salted ? kdfa(hashAlg, salted.salt, 'ATH', nonceTPM, nonceCaller, digestSize(hashAlg) * 8) : EMPTY;
    return new AuthSession(res.handles[0]!, opts.type, hashAlg, sessionKey, nonceCaller, nonceTPM, symmetric);
  }

  /** PolicyPCR; an empty digest lets the TPM take the current PCR values. */
  async policyPCR(session: AuthSession, sel: PcrSelection[], pcrDigest: Uint8Array = EMPTY): Promise<void> {
    const w = new Writer(64).sized16(pcrDigest);
    tpm2.writePcrSelection(w, sel);
    await this.run({ cc: TPM_CC_EXTRA.PolicyPCR, handles: [permanent(session.handle)], auths: [], params: w.finish() });
  }

  async policyGetDigest(session: AuthSession): Promise<Uint8Array> {
    const res = await this.run({ cc: TPM_CC_EXTRA.PolicyGetDigest, handles: [permanent(session.handle)], auths: [], params: EMPTY });
    return res.params.sized16('policyDigest', 64).slice();
  }

  /** The PolicyPCR digest for the PCRs' current values, computed by the TPM in a trial session. */
  async pcrPolicyDigest(sel: PcrSelection[]): Promise<Uint8Array> {
    const trial = await this.startAuthSession({ type: TPM_SE.TRIAL, symmetric: false });
    try {
      const values = await this.pcrRead(sel);
      await this.policyPCR(trial, sel, hash(TPM_ALG.SHA256, ...values.digests));
      return await this.policyGetDigest(trial);
    } finally {
      await this.flushContext(trial.handle);
    }
  }

  // --- objects ----------------------------------------------------------------------

  async createPrimary(hierarchy: Entity, template: Uint8Array, session?: AuthSession, userAuth: Uint8Array = EMPTY): Promise<LoadedObject> {
    const w = new Writer(256);
    w.sized16(sensitiveCreate(userAuth, EMPTY)).sized16(template).sized16(EMPTY).u32(0);
    const res = await this.run({ cc: TPM_CC.CreatePrimary, handles: [hierarchy], auths: [session], params: w.finish(), respHandles: 1, secretIn: true });
    const pub = parsePublic(res.params.sized16('outPublic').slice());
    skipCreation(res.params);
    const name = res.params.sized16('name', 68).slice();
    return { handle: res.handles[0]!, name, public: pub, authValue: userAuth };
  }

  /** Create a child (a key, or sealed `data`); the sensitive part travels CFB-encrypted. */
  async create(parent: Entity, template: Uint8Array, opts: { data?: Uint8Array; userAuth?: Uint8Array; session?: AuthSession } = {}): Promise<{ private: Uint8Array; public: Uint8Array }> {
    const w = new Writer(512);
    w.sized16(sensitiveCreate(opts.userAuth ?? EMPTY, opts.data ?? EMPTY)).sized16(template).sized16(EMPTY).u32(0);
    const res = await this.run({ cc: TPM_CC.Create, handles: [parent], auths: [opts.session], params: w.finish(), secretIn: true });
    const priv = res.params.sized16('outPrivate').slice();
    const pub = res.params.sized16('outPublic').slice();
    skipCreation(res.params);
    return { private: priv, public: pub };
  }

  async load(parent: Entity, blob: { private: Uint8Array; public: Uint8Array }, session?: AuthSession, userAuth?: Uint8Array): Promise<LoadedObject> {
    const w = new Writer(512).sized16(blob.private).sized16(blob.public);
    const res = await this.run({ cc: TPM_CC.Load, handles: [parent], auths: [session], params: w.finish(), respHandles: 1 });
    const name = res.params.sized16('name', 68).slice();
    return { handle: res.handles[0]!, name, public: parsePublic(blob.public), authValue: userAuth };
  }

  async readPublic(handle: number): Promise<LoadedObject> {
    const res = await this.run({ cc: TPM_CC.ReadPublic, handles: [permanent(handle)], auths: [], params: EMPTY });
    const pub = parsePublic(res.params.sized16('outPublic').slice());
    const name = res.params.sized16('name', 68).slice();
    return { handle, name, public: pub };
  }

  /** Make `object` persistent at `persistent` (or evict it when object is persistent). */
  async evictControl(object: Entity, persistent: number, session?: AuthSession): Promise<void> {
    await this.run({ cc: TPM_CC.EvictControl, handles: [permanent(TPM_RH_OWNER), object], auths: [session], params: new Writer(4).u32(persistent).finish() });
  }

  /** Unseal through a (policy) session; the data comes back CFB-encrypted when it can. */
  async unseal(item: Entity, session?: AuthSession): Promise<Uint8Array> {
    const res = await this.run({ cc: TPM_CC.Unseal, handles: [item], auths: [session], params: EMPTY, secretOut: true });
    return res.params.sized16('outData', 128).slice();
  }

  // --- signing and attestation -------------------------------------------------------

  async sign(key: Entity, digest: Uint8Array, session?: AuthSession): Promise<Signature> {
    const w = new Writer(128).sized16(digest).u16(TPM_ALG.NULL).u16(TPM_ST_HASHCHECK).u32(TPM_RH_NULL).sized16(EMPTY);
    const res = await this.run({ cc: TPM_CC.Sign, handles: [key], auths: [session], params: w.finish() });
    return readSignature(res.params);
  }

  async quote(key: Entity, qualifyingData: Uint8Array, sel: PcrSelection[], session?: AuthSession): Promise<{ attest: Uint8Array; parsed: Attest; signature: Signature }> {
    const w = new Writer(128).sized16(qualifyingData).u16(TPM_ALG.NULL);
    tpm2.writePcrSelection(w, sel);
    const res = await this.run({ cc: TPM_CC.Quote, handles: [key], auths: [session], params: w.finish() });
    const attest = res.params.sized16('quoted').slice();
    return { attest, parsed: parseAttest(attest), signature: readSignature(res.params) };
  }

  async certify(object: Entity, signKey: Entity, qualifyingData: Uint8Array, sessions: [AuthSession?, AuthSession?] = []): Promise<{ attest: Uint8Array; parsed: Attest; signature: Signature }> {
    const w = new Writer(64).sized16(qualifyingData).u16(TPM_ALG.NULL);
    const res = await this.run({ cc: TPM_CC_EXTRA.Certify, handles: [object, signKey], auths: [sessions[0], sessions[1]], params: w.finish() });
    const attest = res.params.sized16('certifyInfo').slice();
    return { attest, parsed: parseAttest(attest), signature: readSignature(res.params) };
  }

  /** TPM2_ECDH_ZGen: the shared point of `key`'s private scalar and a peer's public point. */
  async ecdhZGen(key: Entity, peer: EccPoint, session?: AuthSession): Promise<EccPoint> {
    const point = new Writer(80).sized16(peer.x).sized16(peer.y).finish();
    const res = await this.run({ cc: TPM_CC_EXTRA.ECDH_ZGen, handles: [key], auths: [session], params: new Writer(82).sized16(point).finish(), secretOut: true });
    const out = new Reader(res.params.sized16('outPoint', 136));
    const z = { x: out.sized16('x', 66).slice(), y: out.sized16('y', 66).slice() };
    out.expectEnd('TPMS_ECC_POINT');
    return z;
  }

  // --- NV ------------------------------------------------------------------------------

  async nvDefineSpace(nv: NvPublic, opts: { authValue?: Uint8Array; session?: AuthSession } = {}): Promise<Entity> {
    const w = new Writer(128).sized16(opts.authValue ?? EMPTY);
    const pub = new Writer(64);
    writeNvPublic(pub, nv);
    w.sized16(pub.finish());
    await this.run({ cc: TPM_CC.NV_DefineSpace, handles: [permanent(TPM_RH_OWNER)], auths: [opts.session], params: w.finish(), secretIn: true });
    return this.nvEntity(nv.index, opts.authValue);
  }

  /** The index as an entity, with its current name (it changes when first written). */
  async nvEntity(index: number, authValue?: Uint8Array): Promise<Entity & { public: NvPublic }> {
    const res = await this.run({ cc: TPM_CC_EXTRA.NV_ReadPublic, handles: [permanent(index)], auths: [], params: EMPTY });
    const pub = parseNvPublic(res.params.sized16('nvPublic', 128).slice());
    const name = res.params.sized16('nvName', 68).slice();
    return { handle: index, name, authValue, public: pub };
  }

  async nvUndefineSpace(index: number, session?: AuthSession): Promise<void> {
    const nv = await this.nvEntity(index);
    await this.run({ cc: TPM_CC.NV_UndefineSpace, handles: [permanent(TPM_RH_OWNER), nv], auths: [session], params: EMPTY });
  }

  /** Define an 8-byte monotonic counter index, owner- and auth-readable and -writable. */
  async nvDefineCounter(index: number, session?: AuthSession): Promise<void> {
    const a = TPMA_NV;
    await this.nvDefineSpace(
      { index, nameAlg: TPM_ALG.SHA256, attributes: a.COUNTER | a.OWNERWRITE | a.AUTHWRITE | a.OWNERREAD | a.AUTHREAD | a.NO_DA, authPolicy: EMPTY, dataSize: 8 },
      { session },
    );
  }

  async nvIncrement(index: number, session?: AuthSession): Promise<void> {
    const nv = await this.nvEntity(index);
    await this.run({ cc: TPM_CC.NV_Increment, handles: [permanent(TPM_RH_OWNER), nv], auths: [session], params: EMPTY });
  }

  async nvRead(index: number, size: number, offset = 0, session?: AuthSession): Promise<Uint8Array> {
    const nv = await this.nvEntity(index);
    const res = await this.run({ cc: TPM_CC.NV_Read, handles: [permanent(TPM_RH_OWNER), nv], auths: [session], params: new Writer(4).u16(size).u16(offset).finish(), secretOut: true });
    return res.params.sized16('data', 2048).slice();
  }

  /** A counter's value (NV_Read of its 8 bytes). */
  async nvReadCounter(index: number, session?: AuthSession): Promise<bigint> {
    return new Reader(await this.nvRead(index, 8, 0, session)).u64('counter');
  }

  /** NV_Write; the data travels CFB-encrypted when the session can. */
  async nvWrite(index: number, data: Uint8Array, offset = 0, session?: AuthSession): Promise<void> {
    const nv = await this.nvEntity(index);
    const w = new Writer(data.length + 8).sized16(data).u16(offset);
    await this.run({ cc: TPM_CC.NV_Write, handles: [permanent(TPM_RH_OWNER), nv], auths: [session], params: w.finish(), secretIn: true });
  }
}

/** cpHash = H(commandCode || names of all handles || parameters as sent). */
function cpHash(alg: number, cc: number, handles: Entity[], params: Uint8Array): Uint8Array {
  return hash(alg, new Writer(4).u32(cc).finish(), ...handles.map((h) => h.name), params);
}

/** TPMS_SENSITIVE_CREATE: userAuth then data. */
function sensitiveCreate(userAuth: Uint8Array, data: Uint8Array): Uint8Array {
  if (data.length > 128) throw new VtpmError('EOVERSIZE', `sealed data of ${data.length} bytes exceeds 128`);
  return new Writer(data.length + userAuth.length + 4).sized16(userAuth).sized16(data).finish();
}

/** creationData, creationHash, creationTicket of CreatePrimary/Create: not used here. */
function skipCreation(r: Reader): void {
  r.sized16('creationData');
  r.sized16('creationHash', 64);
  r.u16('ticket.tag');
  r.u32('ticket.hierarchy');
  r.sized16('ticket.digest', 64);
}
