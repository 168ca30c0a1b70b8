#!/usr/bin/env bash
# Install the Debian packages sealvm needs, only those missing.
# Runs non-interactively; needs root (as on the project's machines).
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "error: need root to install ${missing[*]} (or install them yourself)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
for i in 1 2 3; do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null; then
        exit 0
    fi
    echo "apt-get failed (attempt $i); retrying in 10 s" >&2
    sleep 10
done
exit 1
