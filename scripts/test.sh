#!/usr/bin/env bash
# Installs what the test suite needs and runs it: the README's test command.
# Debian packages are installed only when missing, and that part needs root.
# The PC/SC tests need pcscd, vsmartcard-vpcd (the virtual reader) and
# libpcsclite-dev (to build pyscard, which has no Linux wheel); where no
# pcscd runs, the tests start their own as a child process.  The PKCS#11
# tests need softhsm2; they make their tokens in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

need_debs=()
command -v openssl >/dev/null || need_debs+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_debs+=(python3-venv)
[ -x /usr/sbin/pcscd ] || command -v pcscd >/dev/null || need_debs+=(pcscd)
[ -f /etc/reader.conf.d/vpcd ] || need_debs+=(vsmartcard-vpcd)
pkg-config --exists libpcsclite 2>/dev/null \
    || [ -f /usr/include/PCSC/winscard.h ] || need_debs+=(libpcsclite-dev)
command -v gcc >/dev/null || need_debs+=(gcc libc6-dev)
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need_debs+=(softhsm2)
if [ ${#need_debs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: needs root to install: ${need_debs[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

# vpcd binds its reader ports (35963, 35964) without SO_REUSEADDR, and the
# suite makes tens of thousands of loopback connections: an ephemeral port
# in TIME_WAIT on 35963 or 35964 would keep a pcscd the tests start from
# opening that reader.  Reserve them from the ephemeral range (root only).
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ "$(id -u)" -eq 0 ] && [ -w "$reserved" ] && ! grep -q 35963 "$reserved"; then
    current=$(cat "$reserved")
    echo "${current:+$current,}35963-35964" > "$reserved" \
        || echo "test.sh: could not reserve ports 35963-35964" >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,pcsc,pkcs11]'
.venv/bin/python -m pytest "$@"
