// A host for tests of frontd (the per-host front-end process): an authority for a run dir,
// frontd started as the manager would start it (the built JavaScript), and guests added by
// hand the way a toolstack wires one: attach (the guest's domid), a real vtpmd for it
// (`vtpmd --front DOMID`, plain state in RUN/NAME/state), connect. Used by frontd.test.ts
// and by the scenario suites and client batteries (the 'frontd' kind of node-kinds.ts).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { builtScript, ensureBuilt } from '../../drivers/base/modules.ts';
import { startDaemon, stopProcess, type StartedDaemon } from '../../drivers/host/daemon.ts';
import { FrontdClient, startFrontd, type StartedFrontd } from '../../drivers/tpmfront/frontd-client.ts';
import type { TpmNode } from '../../drivers/tpmfront/fuse-raw.ts';
import { startAuthority, type AuthorityProcess } from '../../drivers/xen/authority-launch.ts';

export interface FrontdGuest {
  name: string;
  domid: number;
  vtpmd: StartedDaemon;
  /** The guest's node as the front ends' TpmNode (close() = detach). */
  node: TpmNode;
}

export interface FrontdHost {
  dir: string;
  frontd: StartedFrontd;
  client: FrontdClient;
  addGuest(name: string, tpm?: '1.2' | '2.0'): Promise<FrontdGuest>;
  /** Stop every vtpmd, frontd (SIGTERM) and the authority; remove the run dir. */
  stop(): Promise<void>;
}

export async function startFrontdHost(prefix: string, o: { threads?: number } = {}): Promise<FrontdHost> {
  await ensureBuilt();
  const dir = mkdtempSync(join(tmpdir(), `vtpm-${prefix}-`));
  let auth: AuthorityProcess | undefined;
  let frontd: StartedFrontd | undefined;
  const vtpmds: StartedDaemon[] = [];
  const stop = async () => {
    await Promise.all(vtpmds.map((v) => stopProcess(v.pid)));
    if (frontd) await stopProcess(frontd.pid);
    await auth?.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    auth = await startAuthority(dir);
    frontd = await startFrontd(dir, { log: join(dir, 'frontd.log'), script: builtScript('drivers/tpmfront/frontd'), threads: o.threads });
  } catch (e) {
    await stop();
    throw e;
  }
  const client = await FrontdClient.connect(frontd.socket);
  const addGuest = async (name: string, tpm: '1.2' | '2.0' = '2.0'): Promise<FrontdGuest> => {
    const domid = await client.attach(name);
    const vtpmd = await startDaemon(builtScript('vtpmd/main'), ['--dir', dir, '--name', name, '--tpm', tpm, '--front', String(domid)], { log: join(dir, `vtpmd-${name}.log`) });
    vtpmds.push(vtpmd);
    const { node, rmNode } = await client.connect(name, Number(vtpmd.info.domid));
    let closing: Promise<void> | null = null;
    const nodeDir = join(dir, name, 'dev');
    return {
      name,
      domid,
      vtpmd,
      node: {
        path: node,
        rmPath: rmNode,
        dir: nodeDir,
        frontEnd: 'raw',
        // frontd serves it; a test sees it end through list() instead
        ended: new Promise<void>(() => undefined),
        close: () => (closing ??= client.detach(name)),
      },
    };
  };
  return {
    dir,
    frontd,
    client,
    addGuest,
    stop: async () => {
      await client.close().catch(() => undefined);
      await stop();
    },
  };
}
