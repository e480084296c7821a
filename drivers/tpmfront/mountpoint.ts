// Mountpoint hygiene shared by the front ends: create it 0700, clear a dead mount left by
// a killed process ("Transport endpoint is not connected"), refuse a live one, and unmount
// whatever is still mounted when this process exits (also on SIGTERM/SIGINT).
import fs from 'node:fs';
import { dirname } from 'node:path';
import { VtpmError } from '../base/errors.ts';
import { ERRNO, MNT_DETACH, sysUmount } from '../base/libc.ts';

export function prepareMountpoint(dir: string): void {
  try {
    fs.statSync(dir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN' || code === 'ECONNABORTED') {
      const rc = sysUmount(dir, MNT_DETACH); // the stale mount of a killed front end
      if (rc < 0) throw new VtpmError('EBUSY', `cannot clear the stale mount at ${dir} (errno ${-rc})`, { cause: e });
    } else if (code !== 'ENOENT') {
      throw new VtpmError('EIO', `mountpoint ${dir} unusable: ${(e as Error).message}`, { cause: e });
    }
  }
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = fs.statSync(dir);
  if (!st.isDirectory()) throw new VtpmError('EINVAL', `mountpoint ${dir} is not a directory`);
  if (st.dev !== fs.statSync(dirname(dir)).dev) throw new VtpmError('EBUSY', `${dir} is already a mount point`);
  fs.chmodSync(dir, 0o700);
}

/** Live mounts of this process: unmounted (lazily, synchronously) at exit. */
const live = new Map<string, () => Promise<void>>();
let hooked = false;

export function trackMount(dir: string, close: () => Promise<void>, handleSignals: boolean): void {
  live.set(dir, close);
  if (!hooked) {
    hooked = true;
    process.once('exit', () => {
      for (const d of live.keys()) sysUmount(d, MNT_DETACH);
    });
  }
  if (handleSignals) hookSignals();
}

export function untrackMount(dir: string): void {
  live.delete(dir);
}

let signalsHooked = false;
function hookSignals(): void {
  if (signalsHooked) return;
  signalsHooked = true;
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    process.once(sig, () => {
      const all = [...live.values()].map((c) => c().catch(() => undefined));
      const timer = setTimeout(() => process.exit(128 + (sig === 'SIGTERM' ? 15 : 2)), 3000);
      void Promise.all(all).then(() => {
        clearTimeout(timer);
        process.exit(128 + (sig === 'SIGTERM' ? 15 : 2));
      });
    });
  }
}

/** umount2(MNT_DETACH), tolerating "not mounted". */
export function detach(dir: string): void {
  const rc = sysUmount(dir, MNT_DETACH);
  if (rc < 0 && rc !== -ERRNO.EINVAL && rc !== -ERRNO.ENOENT) {
    throw new VtpmError('EIO', `umount ${dir} failed (errno ${-rc})`);
  }
}

/** Unmount what a killed process of ours left below `dir`: every FUSE mount of ours there
 *  whose device name is `source` (a restarted frontd clears its own, not the per-guest
 *  front ends' that share the run dir). Returns the mount points cleared. */
export function clearMountsBelow(dir: string, source: string): string[] {
  const prefix = dir.endsWith('/') ? dir : `${dir}/`;
  const cleared: string[] = [];
  for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    // id parent dev root MOUNTPOINT options [optional...] - FSTYPE SOURCE superopts
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (sep < 0 || f[sep + 1] !== 'fuse.vtpm' || unescapeMountinfo(f[sep + 2] ?? '') !== source) continue;
    const at = unescapeMountinfo(f[4] ?? '');
    if (!at.startsWith(prefix)) continue;
    detach(at);
    cleared.push(at);
  }
  return cleared;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
