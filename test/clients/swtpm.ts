// A `swtpm socket` for one test (scripts/support/swtpm.ts): a private state dir, stopped
// on the test's teardown.

import { launchSwtpm, type SwtpmProcess } from '../../scripts/support/swtpm.ts';
import { scratchDir, type Tap } from './run.ts';

export { freePortPair, stopChild, waitForPort } from '../../scripts/support/swtpm.ts';

export interface Swtpm extends Omit<SwtpmProcess, 'proc'> {
  host: string;
  pid: number;
}

/** opts.stateDir: reuse the state of an earlier swtpm (a "power cycle" of the same TPM). */
export async function startSwtpm(t: Tap, version: '1.2' | '2.0' = '2.0', opts: { stateDir?: string } = {}): Promise<Swtpm> {
  const stateDir = opts.stateDir ?? scratchDir(t, 'swtpm');
  const { proc, ...sw } = await launchSwtpm(version, stateDir);
  // registered after the scratch dir, so it runs first (teardowns run in reverse)
  t.teardown(() => sw.stop());
  return { ...sw, host: '127.0.0.1', pid: proc.pid! };
}
