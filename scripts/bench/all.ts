// `npm run bench`: every benchmark in this folder, one after another, each printing its
// table of our figure beside its comparison from the same run.
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const only = process.argv.slice(2);
const names = readdirSync(here)
  .filter((f) => f.endsWith('.ts') && !['all.ts', 'lib.ts'].includes(f)) // helpers live in support/
  .map((f) => f.replace(/\.ts$/, ''))
  .filter((n) => only.length === 0 || only.includes(n))
  .sort();
let failed = 0;
for (const name of names) {
  const mod = (await import(join(here, `${name}.ts`))) as { main?: () => Promise<void> };
  if (typeof mod.main !== 'function') continue;
  try {
    await mod.main();
  } catch (e) {
    failed++;
    console.error(`bench ${name} failed:`, e);
  }
}
process.exitCode = failed ? 1 : 0;
