// The manager's root key: 32 random bytes that protect every vTPM's state, sealed to the
// host's hardware TPM so that only that TPM, booted into the same measured configuration,
// releases them (vtpmmgr's TPM_Seal of its root key, on TPM 2.0 and with the PCR binding
// Xen's TPM 2.0 path leaves out).
//
// Under TPM_RH_OWNER the storage primary is re-created from a fixed template each time
// (eccStorageTemplate: same seed, same template, same key), so nothing persistent is kept
// in the TPM; it is flushed after use. The root key is a sealed-data object under it whose
// authPolicy is TPM2_PolicyPCR over the chosen PCRs of the SHA-256 bank, so only a policy
// session in which the TPM saw those PCR values can unseal it. The record (TPM2B blobs, PCR
// selection, the PCR values and policy digest at seal time) is CBOR with a version field;
// every field is checked on decode, including that the policy digest is the one the PCR
// values give and the one the public area carries.
//
// The secret never crosses the bus in clear: Create takes it through a salted HMAC session
// (ECDH against the primary) with AES-CFB parameter encryption, and Unseal returns it
// encrypted through a salted policy session.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { decode, encode } from 'cbor-x';
import { VtpmError, describeError } from '../../drivers/base/errors.ts';
import { TpmResponseError } from '../../drivers/tpm/command.ts';
import { Writer } from '../../drivers/tpm/marshal.ts';
import { writePcrSelection } from '../../drivers/tpm/tpm2.ts';
import { type LoadedObject, TPM_CC_EXTRA, type Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import { TPMA_OBJECT, TPM_ALG, hash, parsePublic, sealedDataTemplate } from '../../drivers/tpm/tpm2-structures.ts';
import { type HardwareLike, hardwareClient, isTpmRc, ownerStoragePrimary, withFlush } from './client.ts';
import { SHA256_SIZE, normalisePcrs, readPcrs, sha256Selection } from './pcrs.ts';

export const ROOT_KEY_SIZE = 32;
export const SEALED_ROOT_KEY_VERSION = 1;
const KIND = 'vtpm-root-key';
/** PCRs a manager seals to by default: firmware, option ROM code, boot loader, Secure Boot policy. */
export const DEFAULT_ROOT_KEY_PCRS: readonly number[] = [0, 2, 4, 7];

/** The sealed root key as stored next to the manager's state (see encodeSealedRootKey). */
export interface SealedRootKey {
  version: typeof SEALED_ROOT_KEY_VERSION;
  /** PCRs of the SHA-256 bank the key is bound to, sorted; empty = no PCR binding. */
  pcrs: number[];
  /** Their values when sealed (same order): to say which PCRs differ when unsealing fails. */
  pcrValues: Uint8Array[];
  /** TPM2_PolicyPCR digest over those values: the sealed object's authPolicy. */
  policyDigest: Uint8Array;
  /** Name of the owner storage primary it was sealed under (which TPM, which owner seed). */
  parentName: Uint8Array;
  /** TPM2B_PUBLIC and TPM2B_PRIVATE contents of the sealed-data object, as Create gave them. */
  public: Uint8Array;
  private: Uint8Array;
}

export interface RootKeyOptions {
  /** Owner hierarchy authorisation (empty, as a TPM ships, unless the host set one). */
  ownerAuth?: Uint8Array;
}

export interface PcrDifference {
  pcr: number;
  sealed: Uint8Array;
  current: Uint8Array;
}

const SEALED_ATTRIBUTES = TPMA_OBJECT.fixedTPM | TPMA_OBJECT.fixedParent | TPMA_OBJECT.noDA;
const TPM_RC_POLICY_FAIL = 0x01d;

/** PolicyDigest of a fresh policy session after TPM2_PolicyPCR(selection, H(values)) (Part 3
 *  §23.7): H(zeros || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest). Used to check a
 *  record, and at seal time against the digest the TPM computes in a trial session. */
export function pcrPolicy(pcrs: readonly number[], pcrValues: readonly Uint8Array[]): Uint8Array {
  const w = new Writer(64).u32(TPM_CC_EXTRA.PolicyPCR);
  writePcrSelection(w, sha256Selection(pcrs));
  return hash(TPM_ALG.SHA256, new Uint8Array(SHA256_SIZE), w.finish(), hash(TPM_ALG.SHA256, ...pcrValues));
}

/** Make a new root key and seal it to the hardware TPM's current values of `pcrs` (SHA-256
 *  bank; [] binds it to no PCR: allowed, and the record says so through `pcrs`). */
export async function createSealedRootKey(hw: HardwareLike, pcrs: readonly number[] = DEFAULT_ROOT_KEY_PCRS, opts: RootKeyOptions = {}): Promise<{ rootKey: Uint8Array; sealed: SealedRootKey }> {
  const sel = normalisePcrs(pcrs);
  const c = await hardwareClient(hw);
  return withFlush(c, async (loaded) => {
    const primary = await ownerStoragePrimary(c, loaded, opts.ownerAuth);
    const values = await readPcrs(c, sel);
    const pcrValues = sel.map((p) => values.get(p)!);
    const policyDigest = await trialPolicy(c, sel, pcrValues);
    if (!eq(policyDigest, pcrPolicy(sel, pcrValues))) {
      throw new VtpmError('EPROTO', 'the hardware TPM computed a PCR policy digest other than TPM2_PolicyPCR defines');
    }
    const hmac = await c.startAuthSession({ type: TPM_SE.HMAC, tpmKey: primary });
    loaded.push(hmac.handle);
    // Two independent sources: neither a weak host RNG nor a weak TPM RNG alone decides it.
    const tpmRandom = await c.getRandom(ROOT_KEY_SIZE);
    if (tpmRandom.length !== ROOT_KEY_SIZE) throw new VtpmError('EPROTO', `TPM2_GetRandom gave ${tpmRandom.length} of ${ROOT_KEY_SIZE} bytes`);
    const rootKey = new Uint8Array(randomBytes(ROOT_KEY_SIZE)).map((b, i) => b ^ tpmRandom[i]!);
    const blob = await c.create(primary, sealedDataTemplate(policyDigest), { data: rootKey, session: hmac });
    const sealed: SealedRootKey = { version: SEALED_ROOT_KEY_VERSION, pcrs: sel, pcrValues, policyDigest, parentName: primary.name, public: blob.public, private: blob.private };
    validateSealedRootKey(sealed);
    return { rootKey, sealed };
  });
}

/** Release the root key. Fails with EPCR when the TPM's PCRs differ from those it was sealed
 *  to, EPERM when this is not the TPM (or owner seed) it was sealed under, EINVAL for a damaged
 *  record. Whatever happens, nothing stays loaded in the TPM. */
export async function unsealRootKey(hw: HardwareLike, sealed: SealedRootKey | Uint8Array, opts: RootKeyOptions = {}): Promise<Uint8Array> {
  const rec = sealed instanceof Uint8Array ? decodeSealedRootKey(sealed) : validateSealedRootKey(sealed);
  const c = await hardwareClient(hw);
  return withFlush(c, async (loaded) => {
    const primary = await ownerStoragePrimary(c, loaded, opts.ownerAuth);
    let item: LoadedObject;
    try {
      item = await c.load(primary, { public: rec.public, private: rec.private });
    } catch (e) {
      if (!(e instanceof TpmResponseError)) throw e;
      if (!eq(primary.name, rec.parentName)) {
        throw new VtpmError('EPERM', "the root key was sealed by another hardware TPM (this TPM's owner storage key differs: another host's TPM, or this TPM was cleared); it cannot be unsealed here", { cause: e });
      }
      throw new VtpmError('EINVAL', `the hardware TPM refused the sealed root key record as damaged (${describeError(e)})`, { cause: e });
    }
    loaded.push(item.handle);
    // The TPM took the blobs under this primary, so a different recorded name is damage.
    if (!eq(primary.name, rec.parentName)) bad("names a parent key other than the one the hardware TPM loaded it under");
    const ps = await c.startAuthSession({ type: TPM_SE.POLICY, tpmKey: primary });
    loaded.push(ps.handle);
    await c.policyPCR(ps, sha256Selection(rec.pcrs));
    let key: Uint8Array;
    try {
      key = await c.unseal(item, ps);
    } catch (e) {
      if (!isTpmRc(e, TPM_RC_POLICY_FAIL)) throw e;
      const diff = await pcrDifferences(c, rec);
      const which = diff.length > 0 ? diff.map((d) => d.pcr) : rec.pcrs;
      throw new VtpmError(
        'EPCR',
        `the hardware TPM's PCR${which.length === 1 ? '' : 's'} ${which.join(',')} differ${which.length === 1 ? 's' : ''} from ${diff.length > 0 ? 'the values' : 'those'} the root key was sealed to` +
          ` (sealed to SHA-256 PCRs ${rec.pcrs.join(',')}): refusing to start (the state dir is untouched)`,
        { cause: e },
      );
    }
    if (key.length !== ROOT_KEY_SIZE) throw new VtpmError('EINVAL', `the unsealed root key is ${key.length} bytes, not ${ROOT_KEY_SIZE}`);
    return key;
  });
}

/** The sealed PCRs whose current value differs from the one recorded at seal time ([] when
 *  they all match), for a caller to print what changed in the host's boot. */
export async function pcrDifferences(hw: HardwareLike, sealed: SealedRootKey | Uint8Array): Promise<PcrDifference[]> {
  const rec = sealed instanceof Uint8Array ? decodeSealedRootKey(sealed) : validateSealedRootKey(sealed);
  const now = await readPcrs(hw, rec.pcrs);
  return rec.pcrs.flatMap((pcr, i) => {
    const current = now.get(pcr)!;
    return eq(current, rec.pcrValues[i]!) ? [] : [{ pcr, sealed: rec.pcrValues[i]!, current }];
  });
}

// --- the record -----------------------------------------------------------------------

export function encodeSealedRootKey(rec: SealedRootKey): Uint8Array {
  validateSealedRootKey(rec);
  const { version, pcrs, pcrValues, policyDigest, parentName } = rec;
  return new Uint8Array(encode({ kind: KIND, version, pcrs, pcrValues, policyDigest, parentName, public: rec.public, private: rec.private }));
}

export function decodeSealedRootKey(bytes: Uint8Array): SealedRootKey {
  if (bytes.length > 4096) throw new VtpmError('EOVERSIZE', `sealed root key record of ${bytes.length} bytes`);
  let v: unknown;
  try {
    v = decode(bytes);
  } catch (e) {
    throw new VtpmError('EINVAL', `the sealed root key record is not valid CBOR (${describeError(e)})`, { cause: e });
  }
  const o = v as Record<string, unknown> | null;
  if (typeof o !== 'object' || o === null || Array.isArray(o)) bad('is not a map');
  if (o.kind !== KIND) bad(`is not a ${KIND} record`);
  const known = new Set(['kind', 'version', 'pcrs', 'pcrValues', 'policyDigest', 'parentName', 'public', 'private']);
  for (const k of Object.keys(o)) if (!known.has(k)) bad(`has an unknown field ${JSON.stringify(k)}`);
  return validateSealedRootKey({
    version: o.version as typeof SEALED_ROOT_KEY_VERSION,
    pcrs: o.pcrs as number[],
    pcrValues: o.pcrValues as Uint8Array[],
    policyDigest: o.policyDigest as Uint8Array,
    parentName: o.parentName as Uint8Array,
    public: o.public as Uint8Array,
    private: o.private as Uint8Array,
  });
}

/** Check every field (types, sizes, consistency); returns a copy with plain Uint8Arrays. */
export function validateSealedRootKey(rec: SealedRootKey): SealedRootKey {
  if (rec.version !== SEALED_ROOT_KEY_VERSION) bad(`has version ${String(rec.version)}; this manager reads version ${SEALED_ROOT_KEY_VERSION}`);
  if (!Array.isArray(rec.pcrs) || rec.pcrs.length > 24) bad('has no valid PCR list');
  let pcrs: number[];
  try {
    pcrs = normalisePcrs(rec.pcrs);
  } catch (e) {
    bad(`names an invalid PCR (${describeError(e)})`);
  }
  if (pcrs.length !== rec.pcrs.length || pcrs.some((p, i) => p !== rec.pcrs[i])) bad('has a PCR list that is not sorted and unique');
  if (!Array.isArray(rec.pcrValues) || rec.pcrValues.length !== pcrs.length) bad('does not have one PCR value per sealed PCR');
  const pcrValues = rec.pcrValues.map((d, i) => bytes(d, `PCR ${pcrs[i]} value`, SHA256_SIZE, SHA256_SIZE));
  const policyDigest = bytes(rec.policyDigest, 'policy digest', SHA256_SIZE, SHA256_SIZE);
  const parentName = bytes(rec.parentName, 'parent name', 2 + SHA256_SIZE, 2 + SHA256_SIZE);
  const pub = bytes(rec.public, 'public area', 8, 512);
  const priv = bytes(rec.private, 'private area', 16, 1024);
  if (!eq(policyDigest, pcrPolicy(pcrs, pcrValues))) bad('has a policy digest that does not match its PCR values');
  let area;
  try {
    area = parsePublic(pub);
  } catch (e) {
    bad(`has an unreadable public area (${describeError(e)})`);
  }
  if (area.type !== TPM_ALG.KEYEDHASH || area.nameAlg !== TPM_ALG.SHA256) bad('is not a SHA-256 sealed-data object');
  if (area.attributes !== SEALED_ATTRIBUTES) bad(`has object attributes 0x${area.attributes.toString(16)}, not those of a policy-only sealed object`);
  if (!eq(area.authPolicy, policyDigest)) bad("has a public area whose policy is not the record's policy digest");
  return { version: SEALED_ROOT_KEY_VERSION, pcrs, pcrValues, policyDigest, parentName, public: pub, private: priv };
}

// --- helpers --------------------------------------------------------------------------

/** The policy digest as the TPM computes it in a trial session (flushed at once). */
async function trialPolicy(c: Tpm2Client, pcrs: number[], values: Uint8Array[]): Promise<Uint8Array> {
  return withFlush(c, async (loaded) => {
    const trial = await c.startAuthSession({ type: TPM_SE.TRIAL, symmetric: false });
    loaded.push(trial.handle);
    await c.policyPCR(trial, sha256Selection(pcrs), hash(TPM_ALG.SHA256, ...values));
    return c.policyGetDigest(trial);
  });
}

function bytes(v: unknown, what: string, min: number, max: number): Uint8Array {
  if (!(v instanceof Uint8Array)) bad(`has no ${what} byte string`);
  if (v.length < min || v.length > max) bad(`has a ${what} of ${v.length} bytes (expected ${min === max ? min : `${min}..${max}`})`);
  return new Uint8Array(v);
}

function bad(what: string): never {
  throw new VtpmError('EINVAL', `the sealed root key record ${what}`);
}

function eq(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
