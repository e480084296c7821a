#!/usr/bin/env bash
# The `vtpm` command, from the project's own checkout. It runs the bundled CLI (build/cli/vtpm.js:
# scripts/vtpm.ts and all it imports in a few files, what `npm run build` and every
# `vtpm host start` make beside the daemons' JavaScript in build/) when that build is at
# least as new as every source and input it is made from — Node starts it in a fraction of
# the time tsx takes to compile the TypeScript — and the TypeScript through tsx otherwise.
# The rule is buildIsCurrent()'s in drivers/base/modules.ts.
# Bash itself where it can: each helper process (readlink, dirname) costs a few ms per call.
src=${BASH_SOURCE[0]}
[ -L "$src" ] && src=$(readlink -f "$src")
case $src in */*) ;; *) src="./$src" ;; esac
root=$(cd "${src%/*}/.." && pwd -P)
stamp="$root/build/.stamp"
if [ -f "$root/build/cli/vtpm.js" ] && [ -f "$stamp" ] &&
  [ ! "$root/tsconfig.build.json" -nt "$stamp" ] && [ ! "$root/package-lock.json" -nt "$stamp" ] &&
  [ -z "$(find "$root/drivers" "$root/vtpmd" "$root/manager" "$root/scripts/cli" "$root/scripts/support" "$root/scripts/vtpm.ts" \
    -name '*.ts' -newer "$stamp" -print -quit 2>/dev/null)" ]; then
  exec node "$root/build/cli/vtpm.js" "$@"
fi
exec "$root/node_modules/.bin/tsx" "$root/scripts/vtpm.ts" "$@"
