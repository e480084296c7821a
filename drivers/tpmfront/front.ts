// tpmfront: the guest's front-end driver process (Linux xen-tpmfront). Joins the host's
// authority as the guest domain, connects to its vtpmd through xenbus, and serves the
// guest's tpm0 (and tpmrm0 for a TPM 2.0) through FUSE.
//
//   tsx drivers/tpmfront/front.ts --dir DIR --name NAME [--fuse raw|native]
//
// Start-up (drivers/host/daemon.ts readiness): reports {domid} as soon as it has joined —
// the toolstack needs that domid to start the vtpmd — then reads the vtpmd's domid from
// stdin, completes the handshake and mounts DIR/NAME/dev/tpm0. SIGTERM/SIGINT: unmount,
// close the device (xenbus Closing → Closed), leave, exit 0.
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { readDomidFromStdin, reportFailure, reportReady } from '../host/daemon.ts';
import { dropStartupGarbage } from '../base/modules.ts';
import { describeError, VtpmError } from '../base/errors.ts';
import { Domain } from '../xen/domain.ts';
import { XenbusFront } from './xenbus-front.ts';
import { tpmifBackendSpec } from './backend-tpmif.ts';
import { mountTpmNode, type FrontEnd, type TpmNode } from './mount.ts';

function log(msg: string): void {
  console.error(`${new Date().toISOString()} tpmfront: ${msg}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { dir: { type: 'string' }, name: { type: 'string' }, fuse: { type: 'string', default: 'raw' } } });
  const { dir, name } = values;
  const fuse = values.fuse as FrontEnd;
  if (!dir || !name || (fuse !== 'raw' && fuse !== 'native')) throw new VtpmError('EINVAL', 'usage: front --dir DIR --name NAME [--fuse raw|native]');
  const domain = await Domain.join(resolve(dir), { name: `guest-${name}` });
  reportReady({ ok: true, info: { domid: domain.domid } });
  log(`domain ${domain.domid}`);

  let node: TpmNode | undefined;
  let xf: XenbusFront | undefined;
  let stopping = false;
  const stop = async (why: string, code = 0) => {
    if (stopping) return;
    stopping = true;
    log(`stopping (${why})`);
    await node?.close().catch((e) => log(`unmount: ${(e as Error).message}`));
    await xf?.close().catch((e) => log(`xenbus close: ${(e as Error).message}`));
    await domain.leave().catch(() => {});
    process.exit(code);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  domain.onLost(() => void stop('authority lost', 1));

  try {
    const backendId = await readDomidFromStdin('back end', 30_000);
    xf = await XenbusFront.start(domain, { backendId, reconnect: false });
    xf.onDisconnect(() => log('back end went away: commands now fail with EIO'));
    const link = await xf.connected(15_000);
    log(`connected to vtpmd domain ${backendId}`);
    node = await mountTpmNode({
      dir: join(resolve(dir), name, 'dev'),
      frontEnd: fuse,
      backend: tpmifBackendSpec(link.params),
      handleSignals: false,
    });
    log(`serving ${node.path}${node.rmPath ? ` and ${node.rmPath}` : ''} (${fuse} FUSE front end)`);
    dropStartupGarbage();
    void node.ended.then(() => stop('node stopped serving', 1));
  } catch (e) {
    log(describeError(e));
    await stop('start-up failed', 1);
  }
}

main().catch((e) => {
  log((e as Error).message);
  reportFailure(e);
  process.exit(1);
});
