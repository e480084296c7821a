// Run a command that sees a guest's node as /dev/tpm0, as software written for a real TPM
// expects (tcsd opens /dev/tpm0 itself): in a private mount namespace, /dev is a fresh
// tmpfs holding the usual character devices (Linux's fixed numbers) and the node
// bind-mounted at tpm0 — and the node's tpmrm0 at /dev/tpmrm0 when its directory has one
// (TPM 2.0 guests), as Linux gives every TPM 2.0 both. The host's /dev is never touched,
// and a host without a TPM (no /dev/tpm0 to bind over) works the same.
//   const [file, args] = withNodeAsDevTpm0(node, ['tcsd', '-f']);  spawn(file, args)
//   process.exitCode = await execWithNode(node, ['tcsd', '-f'])    // what `vtpm exec` does
import { spawn } from 'node:child_process';

const SCRIPT = [
  'set -e',
  'mount -t tmpfs -o mode=0755,nosuid,size=64k vtpm-dev /dev',
  'mknod -m 0666 /dev/null c 1 3',
  'mknod -m 0666 /dev/zero c 1 5',
  'mknod -m 0666 /dev/random c 1 8',
  'mknod -m 0666 /dev/urandom c 1 9',
  'mknod -m 0666 /dev/tty c 5 0',
  ': > /dev/tpm0',
  'mount --bind "$0" /dev/tpm0',
  'if [ -e "${0%/*}/tpmrm0" ]; then : > /dev/tpmrm0; mount --bind "${0%/*}/tpmrm0" /dev/tpmrm0; fi',
  'exec "$@"',
].join('\n');

/** The program and arguments to spawn for `command` (needs root: unshare + mount). */
export function withNodeAsDevTpm0(node: string, command: string[]): [string, string[]] {
  if (command.length === 0) throw new Error('no command to run');
  return ['unshare', ['--mount', '--propagation', 'private', 'sh', '-c', SCRIPT, node, ...command]];
}

/** Run `command` seeing `node` as /dev/tpm0, with our terminal; SIGTERM/SIGINT are passed
 *  on. Resolves with its exit code (128 when a signal ended it). */
export async function execWithNode(node: string, command: string[]): Promise<number> {
  const [file, args] = withNodeAsDevTpm0(node, command);
  const child = spawn(file, args, { stdio: 'inherit' });
  const forward = (sig: NodeJS.Signals) => () => child.kill(sig);
  process.on('SIGTERM', forward('SIGTERM'));
  process.on('SIGINT', forward('SIGINT'));
  return new Promise<number>((r) => child.once('exit', (c, sig) => r(c ?? (sig ? 128 : 1))));
}
