// The datapath benchmark's per-hop figures: tpm0 through the raw front end with no vtpmd —
// `engine`: libtpms in the FUSE worker itself; `canned`: a fixed response, so the FUSE
// crossing alone. "tpm0 with vtpmd" minus these is what the tpmif hop and vtpmd add.
// Runs as a child process so its threads are not the benchmark's.
//   tsx scripts/bench/support/engine-node.ts DIR engine|canned   (prints the node path)
import { engineBackendSpec } from '../../../drivers/libtpms/engine-backend.ts';
import { mountTpmNode } from '../../../drivers/tpmfront/mount.ts';
import { cannedBackendSpec } from './canned-backend.ts';

const [dir, kind] = process.argv.slice(2);
const backend = kind === 'canned' ? cannedBackendSpec : engineBackendSpec({ version: '2.0' });
const node = await mountTpmNode({ dir: dir!, frontEnd: 'raw', backend });
console.log(node.path);
