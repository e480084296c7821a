// A throw-away QEMU guest for TPM tests: Debian's kernel (linux-image-amd64: TPM TIS and CRB
// drivers are built in), an initramfs made here from busybox-static and an /init script, a
// q35 machine attached to a swtpm-protocol control socket, the serial console collected.
//   const g = await bootGuest({ ctrlPath, script: 'echo hi' })   // g.lines, g.ms
// The script runs as /init's body after /proc, /sys and /dev are mounted; the guest
// powers off after it. Needs: apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';

export const QEMU = '/usr/bin/qemu-system-x86_64';
export const BUSYBOX = '/bin/busybox';

/** The newest /boot/vmlinuz-*, or undefined. */
export function findKernel(): string | undefined {
  try {
    const k = readdirSync('/boot').filter((f) => f.startsWith('vmlinuz-')).sort();
    return k.length ? join('/boot', k[k.length - 1]!) : undefined;
  } catch {
    return undefined;
  }
}

/** Why a guest cannot boot here, or undefined when it can. */
export function guestUnavailable(): string | undefined {
  if (!existsSync(QEMU)) return `${QEMU} missing (apt-get install -y qemu-system-x86)`;
  if (!findKernel()) return 'no /boot/vmlinuz-* (apt-get install -y linux-image-amd64)';
  if (!existsSync(BUSYBOX)) return `${BUSYBOX} missing (apt-get install -y busybox-static)`;
  return undefined;
}

// ---- initramfs: a newc cpio archive, gzip'd ----

interface Entry {
  name: string;
  mode: number;
  data?: Uint8Array;
  rdev?: [number, number];
}

function cpioNewc(entries: Entry[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const hex = (v: number) => v.toString(16).padStart(8, '0');
  let ino = 1;
  for (const e of [...entries, { name: 'TRAILER!!!', mode: 0 }]) {
    const data = (e as Entry).data ?? new Uint8Array(0);
    const name = Buffer.from(e.name + '\0');
    const rdev = (e as Entry).rdev ?? [0, 0];
    const fields = [ino++, e.mode, 0, 0, 1, 0, data.length, 0, 0, rdev[0], rdev[1], name.length, 0];
    const head = Buffer.from('070701' + fields.map(hex).join(''));
    parts.push(head, name, pad(head.length + name.length), Buffer.from(data), pad(data.length));
  }
  return Buffer.concat(parts);
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

/** Write an initramfs whose /init mounts the pseudo file systems, runs `script`, powers off. */
export function buildInitramfs(path: string, script: string): void {
  const init = [
    '#!/bin/busybox sh',
    '/bin/busybox --install -s /bin',
    'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev',
    script,
    'poweroff -f',
    '',
  ].join('\n');
  const entries: Entry[] = [
    ...['bin', 'dev', 'proc', 'sys', 'tmp'].map((name) => ({ name, mode: S_IFDIR | 0o755 })),
    { name: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] },
    { name: 'bin/busybox', mode: S_IFREG | 0o755, data: readFileSync(BUSYBOX) },
    { name: 'init', mode: S_IFREG | 0o755, data: Buffer.from(init) },
  ];
  writeFileSync(path, gzipSync(cpioNewc(entries), { level: 1 }));
}

/** A shell function for the guest script: `tpmcmd NAME '\ooo...'` writes one command to
 *  /dev/tpm0 in a single write and prints `<prefix> NAME=<response hex>`. */
export function tpmCmdFunction(prefix: string): string {
  return [
    'tpmcmd() {',
    '  printf "$2" > /tmp/cmd',
    '  exec 3<>/dev/tpm0',
    '  dd if=/tmp/cmd bs=4096 count=1 >&3 2>/dev/null',
    '  dd bs=4096 count=1 <&3 2>/dev/null > /tmp/resp',
    '  exec 3>&-',
    `  echo "${prefix} $1=$(hexdump -v -e '/1 "%02x"' /tmp/resp)"`,
    '}',
  ].join('\n');
}

/** The `<prefix> key=value` lines a guest script printed (tpmCmdFunction's and echo's), as a map. */
export function guestValues(prefix: string, lines: string[]): Record<string, string> {
  const kv: Record<string, string> = {};
  const re = new RegExp(`^${prefix} (\\w+)=(.*)$`);
  for (const l of lines) {
    const m = re.exec(l.trim());
    if (m) kv[m[1]!] = m[2]!.trim();
  }
  return kv;
}

/** The response code in a tpmcmd response's hex (-1 when there is no whole header). */
export const responseCode = (hex: string | undefined): number => (hex && hex.length >= 20 ? Buffer.from(hex, 'hex').readUInt32BE(6) : -1);

/** Bytes as a printf format of octal escapes (no % or \ can surprise busybox's printf). */
export function printfOctal(b: Uint8Array): string {
  return Array.from(b, (x) => '\\' + x.toString(8).padStart(3, '0')).join('');
}

export interface GuestOptions {
  /** Extra QEMU arguments attaching the TPM (qemuTpmArgs). */
  tpmArgs: string[];
  /** The /init body. */
  script: string;
  /** Where to write the initramfs. */
  initrd: string;
  accel?: 'tcg' | 'kvm';
  memoryMb?: number;
  timeoutMs?: number;
  /** Each console line as it arrives; `kill` ends the VM at once (pulls its plug). */
  onLine?: (line: string, kill: () => void) => void;
}

export interface GuestRun {
  /** The serial console, line by line. */
  lines: string[];
  /** QEMU start to exit. */
  ms: number;
  code: number | null;
  timedOut: boolean;
}

export async function bootGuest(o: GuestOptions): Promise<GuestRun> {
  const kernel = findKernel();
  if (!kernel) throw new Error('no kernel in /boot');
  buildInitramfs(o.initrd, o.script);
  const args = [
    '-machine', 'q35', '-accel', o.accel ?? 'tcg', '-m', String(o.memoryMb ?? 256),
    '-nodefaults', '-display', 'none', '-serial', 'stdio', '-no-reboot',
    '-kernel', kernel, '-initrd', o.initrd,
    '-append', 'console=ttyS0 quiet panic=-1',
    ...o.tpmArgs,
  ];
  const t0 = Date.now();
  const proc = spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let seen = 0;
  const kill = () => proc.kill('SIGKILL');
  proc.stdout!.on('data', (b: Buffer) => {
    out += b.toString('latin1');
    if (!o.onLine) return;
    const lines = out.split(/\r?\n/);
    for (; seen < lines.length - 1; seen++) o.onLine(lines[seen]!, kill);
  });
  let err = ''; // QEMU's own complaints, after the console
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString('latin1')));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill('SIGKILL');
  }, o.timeoutMs ?? 150_000);
  const code = await new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  clearTimeout(timer);
  return { lines: (out + err).split(/\r?\n/), ms: Date.now() - t0, code, timedOut };
}
