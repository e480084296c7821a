// `npm run build`: compile drivers/, vtpmd/ and manager/ to build/ (what guests' daemons run)
// and bundle the `vtpm` command into build/cli/ (what scripts/vtpm.sh runs), unless build/ is
// already newer than every source. `vtpm host start` does the same on demand (ensureBuilt).
import { BUILD_DIR, buildIsCurrent, ensureBuilt } from '../drivers/base/modules.ts';

const t0 = Date.now();
const was = buildIsCurrent();
await ensureBuilt();
console.log(was ? `${BUILD_DIR}: up to date` : `${BUILD_DIR}: built in ${Date.now() - t0} ms`);
