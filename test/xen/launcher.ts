// Test helper: start an authority for DIR with the lifetime given, print its pid, exit
// (leaving it to live or die by that lifetime).
//   tsx launcher.ts DIR child|detached [LOG]
import { startAuthority } from '../../drivers/xen/authority-launch.ts';

const [dir, lifetime, log] = process.argv.slice(2) as [string, 'child' | 'detached', string | undefined];
const a = await startAuthority(dir, { lifetime, ...(log ? { log } : {}) });
process.stdout.write(`${JSON.stringify({ pid: a.pid })}\n`);
process.exit(0);
