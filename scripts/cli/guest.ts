// `vtpm guest start|stop|list`: thin commands over the toolstack.
import { execWithNode } from '../support/private-dev.ts';
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { VtpmError } from '../../drivers/base/errors.ts';
import { listGuests, readRecord, startGuest, stopGuest, type FuseKind } from '../toolstack.ts';
import { printTable } from './table.ts';
import type { TpmVersion } from '../../drivers/tpm/engine.ts';

const DEFAULT_DIR = '/run/vtpm';

function tpmVersion(v: string): TpmVersion {
  if (v !== '1.2' && v !== '2.0') throw new InvalidArgumentError('use 1.2 or 2.0');
  return v;
}
function fuseKind(v: string): FuseKind {
  if (v !== 'raw' && v !== 'native') throw new InvalidArgumentError('use raw or native');
  return v;
}

export function registerGuest(program: Command): void {
  const guest = program.command('guest').description("guests' vTPMs: a vtpmd and a tpm0 node per guest");
  guest
    .command('start <name>')
    .description('start the vtpmd and tpm0 node of a guest; prints the node path once it answers')
    .option('--tpm <version>', 'TPM version of a new guest (1.2 or 2.0)', tpmVersion, '2.0' as TpmVersion)
    .option('--dir <dir>', 'host runtime dir', DEFAULT_DIR)
    .option('--fuse <kind>', 'FUSE front end: raw (default) or native (fuse-native)', fuseKind, 'raw' as FuseKind)
    .option('--json', 'machine-readable output')
    .action(async (name: string, o: { tpm: TpmVersion; dir: string; fuse: FuseKind; json?: boolean }) => {
      const rec = await startGuest({ dir: o.dir, name, tpm: o.tpm, fuse: o.fuse });
      console.log(o.json ? JSON.stringify(rec) : rec.node);
    });
  guest
    .command('stop <name>')
    .description("stop a guest's vtpmd and node (its TPM state is kept)")
    .option('--dir <dir>', 'host runtime dir', DEFAULT_DIR)
    .action(async (name: string, o: { dir: string }) => {
      const r = await stopGuest(o.dir, name);
      console.log(`guest ${name} stopped (tpmfront ${r.front}, vtpmd ${r.vtpmd})`);
    });
  guest
    .command('exec <name> <command...>')
    .description("run a command that sees the guest's node as /dev/tpm0 (private mount namespace), e.g. tcsd")
    .option('--dir <dir>', 'host runtime dir', DEFAULT_DIR)
    .action(async (name: string, command: string[], o: { dir: string }) => {
      const rec = readRecord(o.dir, name);
      if (!rec) throw new VtpmError('ENOENT', `no guest ${name} in ${o.dir}`);
      process.exitCode = await execWithNode(rec.node, command);
    });
  guest
    .command('list')
    .description('guests of this host dir')
    .option('--dir <dir>', 'host runtime dir', DEFAULT_DIR)
    .option('--json', 'machine-readable output')
    .action((o: { dir: string; json?: boolean }) => {
      const all = listGuests(o.dir);
      if (o.json) return console.log(JSON.stringify(all));
      if (all.length === 0) return console.log(`no guests in ${o.dir}`);
      const rows = all.map((g) => [g.name, g.tpm, g.running ? 'running' : 'stopped', String(g.vtpmd.domid), String(g.front.domid), g.fuse, g.node]);
      printTable(['NAME', 'TPM', 'STATE', 'VTPMD', 'FRONT', 'FUSE', 'NODE'], rows);
    });
}
