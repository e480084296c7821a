// The hardware TPM's endorsement key, the TCG EK Credential Profile's template L-1 (RSA
// 2048, restricted decrypt, PolicySecret(TPM_RH_ENDORSEMENT)): recreated from the
// endorsement seed each time (the key tpm2_createek -G rsa makes; nothing persisted in the
// chip), and credential activation in that TPM: the proof, to a verifier holding only
// this EK's public key, that the host's attestation key (host-ca.ts) lives in the same TPM.
import { VtpmError, describeError } from '../../drivers/base/errors.ts';
import { TpmResponseError } from '../../drivers/tpm/command.ts';
import { permanent, type LoadedObject, type Tpm2Client } from '../../drivers/tpm/tpm2-client.ts';
import { activateCredential, nameOf, policySecret, type Credential } from '../../drivers/tpm/tpm2-credential.ts';
import { TPM_SE } from '../../drivers/tpm/tpm2-session.ts';
import { TPM_RH_ENDORSEMENT } from '../../drivers/tpm/tpm2.ts';
import { hardwareClient, withFlush, type HardwareLike } from '../hardware/client.ts';
import { ekTemplate, publicKeyOf } from './ek.ts';
import { loadEndorsementAk } from './host-ca.ts';

async function loadEk(c: Tpm2Client, loaded: number[]): Promise<LoadedObject> {
  const ek = await c.createPrimary(permanent(TPM_RH_ENDORSEMENT), ekTemplate('rsa'));
  loaded.push(ek.handle);
  return ek;
}

export interface HardwareEk {
  /** TPMT_PUBLIC as the TPM returned it. */
  public: Uint8Array;
  /** SubjectPublicKeyInfo PEM (what tpm2_createek -f pem writes). */
  pem: string;
  name: Uint8Array;
}

export async function hardwareEk(hw: HardwareLike): Promise<HardwareEk> {
  const c = await hardwareClient(hw);
  const ek = await withFlush(c, (loaded) => loadEk(c, loaded));
  if (Buffer.compare(Buffer.from(nameOf(ek.public.bytes)), Buffer.from(ek.name)) !== 0) throw new VtpmError('EPROTO', "the hardware TPM's EK name is not the name of its public area");
  return { public: ek.public.bytes, pem: publicKeyOf(ek.public.bytes).export({ type: 'spki', format: 'pem' }).toString(), name: ek.name };
}

/** The names of this TPM's EK and attestation key: what a challenge made for this TPM names. */
export async function hardwareNames(hw: HardwareLike): Promise<{ ek: Uint8Array; ak: Uint8Array }> {
  const c = await hardwareClient(hw);
  return withFlush(c, async (loaded) => ({ ek: (await loadEk(c, loaded)).name, ak: (await loadEndorsementAk(c, loaded)).name }));
}

/** TPM2_ActivateCredential of `cred` with the EK and the endorsement attestation key. The
 *  TPM alone decides: it returns the secret only for a credential made for its EK and
 *  naming its AK. */
export async function activateInHardware(hw: HardwareLike, cred: Credential): Promise<Uint8Array> {
  const c = await hardwareClient(hw);
  try {
    return await withFlush(c, async (loaded) => {
      const ek = await loadEk(c, loaded);
      const ak = await loadEndorsementAk(c, loaded);
      const session = await c.startAuthSession({ type: TPM_SE.POLICY, symmetric: false });
      loaded.push(session.handle);
      await policySecret(c, session, permanent(TPM_RH_ENDORSEMENT));
      return activateCredential(c, ak, ek, session, cred);
    });
  } catch (e) {
    if (!(e instanceof TpmResponseError)) throw e;
    throw new VtpmError('EPERM', `the hardware TPM refused the challenge (TPM2_ActivateCredential: ${describeError(e)}): it was not made for this TPM's EK and attestation key, or it was altered`, { cause: e });
  }
}
