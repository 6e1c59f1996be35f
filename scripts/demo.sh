#!/usr/bin/env bash
# The whole pipeline on tiny stand-ins, printed command by command so that it doubles as the tutorial.
# Stages whose command has not landed yet are listed, not run; `make demo` stays green meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
REGLUE=${REGLUE:-.venv/bin/reglue}

step() { printf '\n$ %s\n' "$*"; "$@"; }

echo "reglue demo: tiny random-weight stand-ins; no number printed here is comparable to a paper."
step "$REGLUE" train --preset compressor-tiny --dry-run
step "$REGLUE" train --preset tiny-reglue --dry-run
cat <<'MSG'

Not built yet, so not run: reglue encode (issue #3), reglue train without --dry-run (#4),
reglue sample (#5), reglue eval (#6), reglue compare (#7). The demo grows with them (#8).
MSG
