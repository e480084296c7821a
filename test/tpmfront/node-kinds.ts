// The kinds of front end a node scenario suite or client battery runs against, each giving
// a real mounted tpm0 (and tpmrm0 for a TPM 2.0):
//   raw     the raw FUSE worker of this process, the libtpms engine in that worker
//   native  fuse-native on this thread, the engine in an RmThread
//   frontd  the per-host front-end process (frontd-host.ts), a real vtpmd per node
import { join } from 'node:path';
import { engineBackendSpec } from '../../drivers/libtpms/engine-backend.ts';
import type { TransportSpec } from '../../drivers/tpm/transport.ts';
import { mountTpmNode, type FrontEnd, type TpmNode } from '../../drivers/tpmfront/mount.ts';
import { RmThread } from '../../drivers/tpmrm/rm-thread.ts';
import { startFrontdHost, type FrontdHost } from './frontd-host.ts';

export type NodeKind = FrontEnd | 'frontd';

export interface KindNode {
  /** The node (close() unmounts it; for frontd, detaches its guest). */
  node: TpmNode;
  /** A further node of the same kind whose backend the test then takes away. */
  losable(dir: string): Promise<{ node: TpmNode; lose(): Promise<void> }>;
  /** Everything the node needed (for frontd: the vtpmds, frontd, the authority). */
  cleanup(): Promise<void>;
}

/** Whether `kind` can lose a backend under a test: the raw front end's lives inside its own
 *  FUSE worker, with no handle to stop it from outside. */
export const canLoseBackend = (kind: NodeKind): boolean => kind !== 'raw';

/** A node of `kind` below `dir` (raw/native: DIR/dev; frontd: its run dir DIR/run). `backend`
 *  is for raw/native (default: the libtpms engine of `tpm`); frontd's is always a vtpmd. */
export async function mountKind(kind: NodeKind, dir: string, o: { tpm?: '1.2' | '2.0'; backend?: TransportSpec } = {}): Promise<KindNode> {
  const tpm = o.tpm ?? '2.0';
  if (kind === 'frontd') {
    if (o.backend) throw new Error('a frontd node is always served by a vtpmd: no backend spec');
    const host: FrontdHost = await startFrontdHost('kind-frontd');
    let n = 0;
    try {
      const g = await host.addGuest(`g${n++}`, tpm);
      return {
        node: g.node,
        losable: async () => {
          const h = await host.addGuest(`g${n++}`, tpm);
          return { node: h.node, lose: async () => void process.kill(h.vtpmd.pid, 'SIGKILL') };
        },
        cleanup: () => host.stop(),
      };
    } catch (e) {
      await host.stop();
      throw e;
    }
  }
  const node = await mountTpmNode({ dir: join(dir, 'dev'), frontEnd: kind, backend: o.backend ?? engineBackendSpec({ version: tpm }), handleSignals: false });
  return {
    node,
    losable: async (d) => {
      if (kind !== 'native') throw new Error(`${kind}: cannot lose its backend`);
      const transport = await RmThread.start(engineBackendSpec({ version: tpm }), { tpmrm: false });
      const n2 = await mountTpmNode({ dir: d, frontEnd: kind, backend: transport, handleSignals: false });
      return { node: n2, lose: () => transport.close() };
    },
    cleanup: () => node.close(),
  };
}
