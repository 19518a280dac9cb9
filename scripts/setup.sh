#!/usr/bin/env bash
# Installs what sheep needs on a Debian machine (as root): apt packages, then a virtualenv
# with the project in it. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
APT_PACKAGES=(etcd-server python3-venv qemu-utils qemu-block-extra libnbd-bin nbdkit fio libiscsi-bin
              qemu-system-x86 cpio)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to install ${missing[*]} (or install them yourself)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server's package starts a system etcd on :2379; sheep runs its own, so leave it be
# but never depend on it.

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.sheep-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing sheep into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$stamp"
fi

# The guest that demos and tests boot (qemu_driver/guest.py), built from Debian packages now
# so that booting it never needs the network; a stamp check when already built.
bash scripts/build-guest.sh
