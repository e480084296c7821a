#!/usr/bin/env bash
# The test command: set-up, type check, then every test through the real TPM stack.
# Ends with the line "N passed, M failed" and fails when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }
passed=0; failed=0
echo "# typecheck (tsc --noEmit)"
if npx --no-install tsc --noEmit -p .; then passed=$((passed + 1)); echo "ok typecheck"; else failed=$((failed + 1)); echo "not ok typecheck"; fi
echo "# build (runtime JavaScript for the guests' daemons)"
if npx --no-install tsx scripts/build.ts; then passed=$((passed + 1)); echo "ok build"; else failed=$((failed + 1)); echo "not ok build"; fi
log=$(mktemp /tmp/vtpm-tap.XXXXXX)
# Each tap file's top-level subtests are counted as tests; tap's own summary is not read by CI.
npx --no-install tap --reporter=tap "$@" 2>&1 | grep -v 'Unknown user config' | tee "$log"
tap_rc=${PIPESTATUS[0]}
p=$(grep -cE '^    ok [0-9]+ ' "$log" || true)
f=$(grep -cE '^    not ok [0-9]+ ' "$log" || true)
# A test file that crashed before reporting its subtests shows only at top level.
top_fail=$(grep -cE '^not ok [0-9]+ ' "$log" || true)
if [ "$tap_rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=$((top_fail > 0 ? top_fail : 1)); fi
rm -f "$log"
passed=$((passed + p)); failed=$((failed + f))
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
