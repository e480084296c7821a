// The guest's real backend: the tpmif shared page + event channel to its vtpmd, attached
// inside whichever thread serves the node (the raw FUSE worker, or fuse-native's backend
// worker), where the TpmifFront blocks on the futex with no event loop involved.
//   spec = tpmifBackendSpec(link.params)   // link from XenbusFront.connected()
import { VtpmError } from '../base/errors.ts';
import { codeFile } from '../base/modules.ts';
import { SpinGovernor } from '../xen/spin.ts';
import type { TpmifParams } from '../xen/tpmif-page.ts';
import { TpmifFront } from './tpmif-front.ts';
import type { TransportSpec, SyncTransport } from '../tpm/transport.ts';

/** Longest a command may run in the vTPM: RSA key generation in libtpms can take seconds;
 *  a dead vtpmd is noticed sooner (the event channel wakes the waiter with ECLOSED). */
const COMMAND_TIMEOUT_MS = 120_000;
/** Collecting a response, spin up to this long (not while the host's cores are all busy:
 *  SpinGovernor): most commands finish in a few µs, a futex sleep and wake-up costs tens,
 *  and vtpmd then answers without a wake syscall. Measured (tpm0 GetRandom median, one
 *  guest): ~70 µs without, ~53 µs with 15–50 µs. VTPM_SPIN_US overrides it (0: never). */
const SPIN_US = 30;

export function tpmifBackendSpec(params: TpmifParams): TransportSpec {
  return { module: codeFile('drivers/tpmfront/backend-tpmif'), export: 'createTpmifBackend', params };
}

export function createTpmifBackend(params: unknown): SyncTransport {
  const p = params as TpmifParams;
  if (!p || typeof p !== 'object' || !p.page || !p.evtchn) throw new VtpmError('EINVAL', 'tpmif backend needs TpmifParams { page, extra, evtchn }');
  const spin = new SpinGovernor(Number(process.env.VTPM_SPIN_US ?? SPIN_US));
  // the front end is done with a response (read, or dropped) before the next command
  return TpmifFront.attach(p, { timeoutMs: COMMAND_TIMEOUT_MS, spinUs: () => spin.next(), reuseResponse: true });
}
