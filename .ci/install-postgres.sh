#!/usr/bin/env bash
# PostgreSQL server binaries for tests/test_stack.py, which starts its own throwaway
# cluster (as the `postgres` user when run as root). A no-op where they are installed.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# The tests make their own cluster: keep the package from creating and starting one.
$SUDO mkdir -p /etc/postgresql-common
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql-15 \
    || $SUDO apt-get install -y -qq --no-install-recommends postgresql

ls /usr/lib/postgresql/*/bin/initdb >/dev/null
