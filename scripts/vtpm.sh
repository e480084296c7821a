#!/usr/bin/env bash
# The `vtpm` command: runs the TypeScript CLI through tsx from the project's own checkout.
src=$(readlink -f "${BASH_SOURCE[0]}")
root=$(dirname "$(dirname "$src")")
exec "$root/node_modules/.bin/tsx" "$root/scripts/vtpm.ts" "$@"
