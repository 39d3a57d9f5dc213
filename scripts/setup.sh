#!/usr/bin/env bash
# Idempotent set-up: Debian packages for the real services, then .venv with cbctl[test].
# Installs only what is missing; where it cannot install (not root, no apt-get) it prints the
# exact command to run and stops with exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

# Binaries we need -> the Debian package that provides each.
declare -A PKG=(
  [etcd]=etcd-server [etcdctl]=etcd-client [nats-server]=nats-server [redis-server]=redis-server
  [prometheus]=prometheus [nft]=nftables [iptables]=iptables [chronyd]=chrony [faketime]=faketime
  [ip]=iproute2 [openssl]=openssl
)
missing=()
for bin in "${!PKG[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${PKG[$bin]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root:  $cmd" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.cbctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
echo "setup: ok (.venv ready)" >&2
