#!/usr/bin/env bash
# Installs the Debian packages the tests need (names given as arguments),
# skipping those already installed. Not root: names them and fails.
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "blockd tests need these Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/blockd-apt.log 2>&1; then
  apt-get update >/tmp/blockd-apt-update.log 2>&1
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
