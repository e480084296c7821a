// Daemons a manager starts beside its instances (frontd, vtpmd groups) are recorded in the
// run dir with their start time, so a later manager or `vtpm host stop` can stop the ones a
// manager killed outright left running, and never signals a reused pid.
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { decode, encode } from 'cbor-x';
import { stopProcess } from '../drivers/host/daemon.ts';
import { readBounded, writeFileAtomic } from '../drivers/host/state-dir.ts';

export const FRONTD_RECORD = 'frontd.cbor';
export const FRONTD_LOG = 'frontd.log';
export const GROUPS_DIR = 'groups';

/** `start`: the process's start time (procStartTime from drivers/base/libc.ts). */
export function recordProcess(file: string, pid: number, start: number): void {
  writeFileAtomic(file, encode({ v: 1, pid, start }));
}

/** Stop the process `file` records, if it still runs: its pid, or undefined. */
export async function stopRecorded(file: string, ms: number): Promise<number | undefined> {
  const bytes = readBounded(file, 256, 'a daemon record');
  if (!bytes) return undefined;
  const r = decode(bytes) as { v?: unknown; pid?: unknown; start?: unknown };
  // Loaded here: the CLI (vtpm host stop) uses this, and koffi costs every other command.
  const { processAlive } = await import('../drivers/base/libc.ts');
  if (!(r?.v === 1 && Number.isInteger(r.pid) && Number.isInteger(r.start) && processAlive(r.pid as number, r.start as number))) return undefined;
  await stopProcess(r.pid as number, ms);
  return r.pid as number;
}

/** The frontd of `runDir` a killed manager left (it detaches its guests and unmounts). */
export function stopLeftFrontd(runDir: string): Promise<number | undefined> {
  return stopRecorded(join(runDir, FRONTD_RECORD), 30_000);
}

/** Every vtpmd group process of `runDir` a killed manager left (each stops its members orderly). */
export async function stopLeftGroups(runDir: string): Promise<number[]> {
  const dir = join(runDir, GROUPS_DIR);
  if (!existsSync(dir)) return [];
  const stopped: number[] = [];
  for (const f of readdirSync(dir).filter((n) => n.endsWith('.cbor'))) {
    const pid = await stopRecorded(join(dir, f), 60_000);
    if (pid !== undefined) stopped.push(pid);
  }
  return stopped;
}
