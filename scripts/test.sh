#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine with Python 3.11, then run it:
# Redis, Prometheus, PostgreSQL and nginx (the benchmark's proxy-hop path) from Debian, the
# gateway's virtual environment, vLLM's CPU build in its own virtual environment with a tiny model
# generated offline. Exits non-zero when any test fails.
# Arguments are passed to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

apt_install redis-server redis-tools prometheus postgresql
apt_install_unstarted nginx
gateway_venv test
bash "$ROOT/scripts/setup-vllm.sh"

status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "capgate: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
