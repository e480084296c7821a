#!/usr/bin/env bash
# The `vtpm` command, from the project's own checkout. It runs the compiled CLI
# (build/scripts/vtpm.js, what `npm run build` and every `vtpm host start` make) when that
# is at least as new as every source it is made from — Node starts it in a fraction of the
# time tsx takes to compile the TypeScript — and the TypeScript through tsx otherwise.
src=$(readlink -f "${BASH_SOURCE[0]}")
root=$(dirname "$(dirname "$src")")
stamp="$root/build/.stamp"
if [ -f "$root/build/scripts/vtpm.js" ] && [ -f "$stamp" ] && [ ! "$root/tsconfig.build.json" -nt "$stamp" ] &&
  [ -z "$(find "$root/drivers" "$root/vtpmd" "$root/manager" "$root/scripts/cli" "$root/scripts/support" "$root/scripts/vtpm.ts" \
    -name '*.ts' -newer "$stamp" -print -quit 2>/dev/null)" ]; then
  exec node "$root/build/scripts/vtpm.js" "$@"
fi
exec "$root/node_modules/.bin/tsx" "$root/scripts/vtpm.ts" "$@"
