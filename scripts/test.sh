#!/usr/bin/env bash
# Installs what the test suite needs and runs it: the README's test command.
# Debian packages are installed only when missing, and that part needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

need_debs=()
command -v openssl >/dev/null || need_debs+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_debs+=(python3-venv)
if [ ${#need_debs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: needs root to install: ${need_debs[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pytest "$@"
