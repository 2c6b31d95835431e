# Shared set-up steps of scripts/test.sh and scripts/quickstart.sh (sourced, not run).
# Installs what a fresh Debian machine with Python 3.11 lacks; every step is skipped when done.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CAPGATE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "capgate: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian starts a system redis-server on 6379 when it installs it; capgate runs its own.
}

# apt_install_unstarted PKG...: apt_install, with Debian's start of the package's service denied
# (nginx would otherwise listen on every address, port 80); capgate's tests and bench run their own.
apt_install_unstarted() {
  local policy=/usr/sbin/policy-rc.d
  if [ -e "$policy" ]; then apt_install "$@"; return; fi
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod +x "$policy"
  local status=0
  apt_install "$@" || status=$?
  as_root rm -f "$policy"
  return "$status"
}

# gateway_venv [EXTRAS]: the gateway's virtual environment with capgate installed (editable).
gateway_venv() {
  local target=$ROOT
  [ -n "${1:-}" ] && target="$ROOT[$1]"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "capgate: creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  echo "capgate: installing capgate${1:+[$1]} into $VENV"
  "$VENV/bin/pip" install -q -e "$target"
}

# wait_http URL SECONDS PID: wait until URL answers 200, failing early if PID exits.
wait_http() {
  local url=$1 deadline=$((SECONDS + $2)) pid=$3
  until "$VENV/bin/python" -c "import httpx,sys; sys.exit(httpx.get('$url', timeout=2).status_code != 200)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "capgate: process $pid exited while waiting for $url" >&2; return 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "capgate: $url not ready after $2 s" >&2; return 1; fi
    sleep 1
  done
}
