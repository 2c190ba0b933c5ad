#!/usr/bin/env bash
# The checks CI runs before the tests: every Go file gofmt-clean, and go vet clean.
# Run from anywhere: scripts/ci-checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || PATH=/usr/local/go/bin:$PATH

unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
  echo "ci-checks: not gofmt-clean (fix with: gofmt -w <file>):" >&2
  echo "$unformatted" >&2
  exit 1
fi
go vet ./...
echo "ci-checks: ok"
