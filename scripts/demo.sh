#!/usr/bin/env bash
# The main job: install what is needed, then show the stack working on this host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
./scripts/vtpm.sh engine selftest
