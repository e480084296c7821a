// The trousers daemon tcsd for one test, and the environment tpm-tools need to reach it.
// tcsd opens /dev/tpm0 itself and takes no device option, so for a guest node it runs in
// a private mount namespace where /dev is a fresh tmpfs holding null/zero/random/urandom
// and the guest's node bind-mounted at /dev/tpm0: the host's /dev is never touched, and
// the mounts vanish with the namespace when tcsd exits. For a TPM on TCP (swtpm) tcsd
// has its own switch (-e with TCSD_TCP_DEVICE_*), used to prove the battery itself.

import { withNodeAsDevTpm0 } from '../../scripts/support/private-dev.ts';
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { access, rm } from 'node:fs/promises';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { scratchDir, type Tap } from './run.ts';
import { freePortPair, stopChild, waitForPort } from './swtpm.ts';

/** A guest's device node (path), or a raw TPM 1.2 byte stream on TCP (swtpm socket). */
export type TcsdDevice = { node: string } | { tcp: { host: string; port: number } };

export interface Tcsd {
  port: number;
  pid: number;
  /** environment for tpm-tools: where the tcsd is, and a private user PS file and HOME */
  clientEnv: NodeJS.ProcessEnv;
  /** the dir tpm-tools run in (root-owned, 0700) */
  clientDir: string;
  log: () => string;
  stop: () => Promise<void>;
  /** tcsd's system persistent storage (the SRK's and registered keys' records), as a
   *  machine's /var/lib/tpm/system.data: it travels with the machine's disk. */
  systemPsFile: string;
}

function tssIds(): { uid: number; gid: number } {
  // tcsd switches to user tss and insists its config is root:tss 0640
  const id = (flag: string): number => Number(execFileSync('id', [flag, 'tss'], { encoding: 'utf8', timeout: 5000 }).trim());
  return { uid: id('-u'), gid: id('-g') };
}

/** tcsd's private dir: owned by tss (it writes system.data there), 0700, removed on teardown. */
function tcsdDir(t: Tap, port: number, systemPs?: Buffer): string {
  if (userInfo().uid !== 0) throw new Error('tcsd needs root (it switches to user tss; the namespace needs CAP_SYS_ADMIN)');
  const { uid, gid } = tssIds();
  const dir = mkdtempSync(join(tmpdir(), 'vtpm-tcsd-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  chownSync(dir, uid, gid);
  chmodSync(dir, 0o700);
  for (const f of ['firmware.log', 'kernel.log']) writeFileSync(join(dir, f), '', { mode: 0o600 });
  if (systemPs) {
    writeFileSync(join(dir, 'system.data'), systemPs, { mode: 0o600 });
    chownSync(join(dir, 'system.data'), uid, gid);
  }
  const conf = join(dir, 'tcsd.conf');
  writeFileSync(
    conf,
    [
      `port = ${port}`,
      `system_ps_file = ${join(dir, 'system.data')}`,
      `firmware_log_file = ${join(dir, 'firmware.log')}`,
      `kernel_log_file = ${join(dir, 'kernel.log')}`,
      '',
    ].join('\n'),
  );
  chownSync(conf, 0, gid);
  chmodSync(conf, 0o640);
  return dir;
}

export async function startTcsd(t: Tap, device: TcsdDevice, opts: { startTimeoutMs?: number; systemPs?: Buffer } = {}): Promise<Tcsd> {
  // asynchronous on purpose: the node may be a FUSE file served by this very thread
  if ('node' in device) await access(device.node).catch(() => Promise.reject(new Error(`device node ${device.node} does not exist`)));
  const port = await freePortPair();
  const dir = tcsdDir(t, port, opts.systemPs);
  const conf = join(dir, 'tcsd.conf');
  // only the variables tcsd reads; an inherited TCSD_USE_TCP_DEVICE would redirect it
  const baseEnv: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C' };
  const child =
    'node' in device
      ? spawn(...withNodeAsDevTpm0(device.node, ['tcsd', '-f', '-c', conf]), {
          env: baseEnv,
          stdio: ['ignore', 'pipe', 'pipe'],
        })
      : spawn('tcsd', ['-e', '-f', '-c', conf], {
          env: { ...baseEnv, TCSD_TCP_DEVICE_HOSTNAME: device.tcp.host, TCSD_TCP_DEVICE_PORT: String(device.tcp.port) },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  const log = (): string => out;
  const stop = (): Promise<void> => stopChild(child);
  t.teardown(stop);
  await waitForPort(port, child, opts.startTimeoutMs ?? 10_000, 'tcsd', log);

  const clientDir = scratchDir(t, 'tpm12');
  mkdirSync(join(clientDir, 'home'), { mode: 0o700 });
  const clientEnv: NodeJS.ProcessEnv = {
    PATH: baseEnv.PATH,
    LANG: 'C',
    HOME: join(clientDir, 'home'),
    TSS_TCSD_HOSTNAME: '127.0.0.1',
    TSS_TCSD_PORT: String(port),
    TSS_USER_PS_FILE: join(clientDir, 'user.data'),
  };
  return { port, pid: child.pid!, clientEnv, clientDir, log, stop, systemPsFile: join(dir, 'system.data') };
}
