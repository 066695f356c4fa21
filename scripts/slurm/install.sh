#!/usr/bin/env bash
# Install the Debian packages needed by tests.harness.slurm_cluster.LocalSlurmCluster:
# MUNGE, SLURM (slurmctld, slurmd, slurmdbd, clients; Debian 12 ships 22.05) and MariaDB; iproute2 and
# util-linux (ip, nsenter, unshare) for the multi-node cluster of tests/integration/multinode/.
#
# Idempotent: exits quickly when every package is already installed.
# System daemons are NOT started: a temporary /usr/sbin/policy-rc.d that exits 101
# blocks invoke-rc.d during the install (it is removed afterwards, only if this
# script created it). The test cluster starts its own private daemons.
#
# Usage: sudo scripts/slurm/install.sh     (must run as root)
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux)

log() { echo "[slurm-install] $*"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all packages already installed: ${PACKAGES[*]}"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "ERROR: missing packages (${missing[*]}) and not running as root; rerun with sudo." >&2
    exit 1
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if [[ $created_policy -eq 1 && -f $POLICY ]]; then
        rm -f "$POLICY"
        log "removed temporary $POLICY"
    fi
}
trap cleanup EXIT

if [[ -e $POLICY ]]; then
    log "$POLICY already exists; leaving it in place (not created by this script)"
else
    printf '#!/bin/sh\n# temporary, written by rift_dist scripts/slurm/install.sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    created_policy=1
    log "wrote temporary $POLICY (exit 101) so package scripts do not start daemons"
fi

export DEBIAN_FRONTEND=noninteractive
# (capture first: `apt-cache | grep -q` would trip pipefail via SIGPIPE)
policy_out=$(apt-cache policy "${missing[0]}" 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy_out"; then
    log "package lists look empty; running apt-get update"
    apt-get update
fi
log "installing: ${missing[*]}"
apt-get install -y --no-install-recommends "${PACKAGES[@]}"

for bin in munged mungekey slurmctld slurmd slurmdbd sinfo sacctmgr mariadbd mariadb-install-db ip nsenter unshare; do
    if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$bin ]]; then
        log "ERROR: $bin not found after install" >&2
        exit 1
    fi
done
log "done: $(slurmctld -V 2>/dev/null || true), $(mariadbd --version 2>/dev/null | head -1 || true)"
