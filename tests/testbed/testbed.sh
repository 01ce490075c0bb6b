#!/usr/bin/env bash
# testbed.sh up|down|status -- the nsdf-hpc integration testbed on one Debian 12/13 machine.
#
#   up      install (apt, only what is missing) and start everything; idempotent and fast
#           when everything is already there (about 5-10 s, mostly the smoke checks)
#   down    stop the daemons this script started (registry, Slurm); packages, images and
#           state stay, so the next `up` is fast
#   status  one line per component; exit 0 only when everything the tests need is up
#
# What `up` gives (facts the tests read from $NSDF_TESTBED_ENV, default
# /var/lib/hpc-runtimes/testbed.env):
#   * an OCI registry: HTTP 127.0.0.1:5000 and TLS 127.0.0.1:5443 (CA trusted system-wide),
#     images hpc/{busybox,pydeb}:{latest,oci}, nsdf/{busybox,pydeb}:v1.0.0 and
#     library/{busybox,pydeb}:latest (so the registry serves as a docker.io site mirror),
#     library/debian:12-slim (debootstrap; the base of recipes/nsdf-python and nsdf-openvisus);
#     nsdf/python:v1.0.0 built from recipes/nsdf-python (Python 3 + numpy, for the examples) and
#     nsdf/mpi:v1.0.0 from recipes/nsdf-mpi (Open MPI + mpi4py, for tests/integration/test_mpi.py);
#     multi-arch: hpc/multi:latest (an index: linux/amd64 + linux/arm64), hpc/armonly:latest
#     (one arm64 manifest) and hpc/armonly:index (an index with only linux/arm64);
#     the same images as docker-archive, oci-archive and OCI layout files; and a TLS registry
#     that requires a login, 127.0.0.1:5444 (user nsdf-ci, password file root-only)
#   * Apptainer, Charliecloud, Podman and UDocker, working as root and as user hpcuser
#   * podman-hpc from PyPI (podman-hpc.sh: a static mksquashfs, /etc/podman_hpc)
#   * a Slurm cluster: munge, slurmctld, slurmdbd + a private MariaDB (sacct works), two
#     slurmd nodes (c1, c2) on loopback sharing this machine's filesystem
#   * slurmrestd with JWT on http://127.0.0.1:6820 (run as user slurmrest; the controller
#     accepts auth/jwt as an alternative type). A token: `scontrol token username=USER`;
#     root's is saved in $SLURM_CI_ROOT/restd-token.env (0600). SLURM_CI_RESTD=0 leaves it out.
#   * /etc/nsdf-hpc/config.toml: the site config, mapping docker.io to the local mirror
#
# Everything runs as root, non-interactively. Knobs: see runtimes.sh (HPCRT_*) and
# slurm-start.sh (SLURM_CI_*). NSDF_TESTBED_VERIFY=1 forces the runtime smoke checks
# (they run by default only on the first `up` of a machine).
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HPCRT_ROOT=${HPCRT_ROOT:-/var/lib/hpc-runtimes}
export HPCRT_USER=${HPCRT_USER:-hpcuser}
export SLURM_CI_ROOT=${SLURM_CI_ROOT:-/var/tmp/slurm-ci}
export SLURM_CI_NODES=${SLURM_CI_NODES:-2}
export SLURM_CI_ACCOUNTING=${SLURM_CI_ACCOUNTING:-slurmdbd}
# slurmrestd + JWT for the REST backend's tests (slurm-stop.sh stops it with the rest)
export SLURM_CI_RESTD=${SLURM_CI_RESTD:-1}
export SLURM_CI_RESTD_LISTEN=${SLURM_CI_RESTD_LISTEN:-127.0.0.1:6820}
# Advertise more CPUs than exist so array/throughput tests are not serialised on 2 cores
# (see ../shared/testbed/slurm/NOTES.md "Scheduling latency").
export SLURM_CI_CPUS=${SLURM_CI_CPUS:-16}
# Finished jobs stay in slurmctld's memory long enough for the squeue/scontrol
# (accounting-disabled) path, and a lower value keeps squeue cheap.
export SLURM_CI_MIN_JOB_AGE=${SLURM_CI_MIN_JOB_AGE:-600}
# A killed slurmd makes its node DOWN (and its jobs NODE_FAIL) after this many seconds
# (Slurm's default, 300 s, is too long for a test; measured with 10 s: NODE_FAIL 29 s after the
# kill; 20 s leaves a loaded 2-core CI machine room before a busy slurmd counts as dead).
export SLURM_CI_SLURMD_TIMEOUT=${SLURM_CI_SLURMD_TIMEOUT:-20}
# --mem enforced by task/cgroup (jobs over it end OUT_OF_MEMORY) where that works: Slurm
# 22.05 on the hybrid cgroup v1 of the CI's Debian 12 machines (see slurm-start.sh).
export SLURM_CI_CGROUP=${SLURM_CI_CGROUP:-auto}
ENV_FILE=${NSDF_TESTBED_ENV:-$HPCRT_ROOT/testbed.env}
SITE_CONF=${NSDF_HPC_SITE_CONFIG:-/etc/nsdf-hpc/config.toml}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
# The daemons started below must not inherit the caller's descriptors: run under
# `flock LOCK testbed.sh up`, slurmdbd and slurmrestd held the lock for their whole life.
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  [ "$fd" -gt 2 ] && [ "$fd" != 255 ] && eval "exec $fd>&-" 2>/dev/null || true
done

write_site_config() {
  mkdir -p "$(dirname "$SITE_CONF")"
  cat > "$SITE_CONF.tmp" <<EOF
# nsdf-hpc site configuration, written by tests/testbed/testbed.sh.
# This machine has no internet: docker.io names are served by the local registry,
# as a site mirror would serve them on a cluster whose compute nodes are offline.
[mirrors]
"docker.io" = "127.0.0.1:5443"
EOF
  mv "$SITE_CONF.tmp" "$SITE_CONF"
}

write_env_file() {
  local img=$HPCRT_ROOT/images
  cat > "$ENV_FILE.tmp" <<EOF
# written by tests/testbed/testbed.sh up; read by tests/conftest.py
NSDF_TESTBED_REGISTRY_HTTP=127.0.0.1:5000
NSDF_TESTBED_REGISTRY_TLS=127.0.0.1:5443
NSDF_TESTBED_REGISTRY_AUTH=${HPCRT_REG_AUTH:-127.0.0.1:5444}
NSDF_TESTBED_REGISTRY_AUTH_USER=nsdf-ci
NSDF_TESTBED_REGISTRY_AUTH_PASSWORD_FILE=$HPCRT_ROOT/registry/auth.password
NSDF_TESTBED_USER=$HPCRT_USER
NSDF_TESTBED_IMAGES=$img
NSDF_TESTBED_SLURM_NODES=$SLURM_CI_NODES
NSDF_TESTBED_SLURM_ACCOUNTING=$SLURM_CI_ACCOUNTING
NSDF_TESTBED_SLURM_ROOT=$SLURM_CI_ROOT
NSDF_TESTBED_SITE_CONFIG=$SITE_CONF
EOF
  if [ "$SLURM_CI_RESTD" = 1 ]; then
    echo "NSDF_TESTBED_SLURMRESTD_URL=http://$SLURM_CI_RESTD_LISTEN" >> "$ENV_FILE.tmp"
  fi
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

up() {
  local t0=$SECONDS steps=(packages host user registry registry-auth images base-images multiarch-images podman recipe-images charliecloud udocker apptainer)
  if [ "${NSDF_TESTBED_VERIFY:-0}" = 1 ] || [ ! -e "$HPCRT_ROOT/.verified" ]; then steps+=(verify); fi
  log "runtimes + registry + images: ${steps[*]}"
  bash "$HERE/runtimes.sh" "${steps[@]}"
  touch "$HPCRT_ROOT/.verified"
  log "podman-hpc (PyPI) with a static mksquashfs"
  bash "$HERE/podman-hpc.sh" up
  log "slurm: $SLURM_CI_NODES nodes, accounting=$SLURM_CI_ACCOUNTING, slurmrestd=$SLURM_CI_RESTD"
  bash "$HERE/slurm-start.sh"
  # A shared scratch area that every node and the unprivileged user can write to,
  # as /scratch is on a cluster (the nodes here share this machine's filesystem).
  install -d -m 1777 /var/tmp/nsdf-scratch
  write_site_config
  write_env_file
  log "up in $((SECONDS - t0)) s"
}

down() {
  [ -x "$HERE/slurm-stop.sh" ] && bash "$HERE/slurm-stop.sh" || true
  bash "$HERE/runtimes.sh" registry-stop || true
  rm -f "$ENV_FILE"
  log "down"
}

status() {
  local rc=0
  bash "$HERE/runtimes.sh" status || rc=1
  bash "$HERE/podman-hpc.sh" status || rc=1
  if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    printf '%-14s %s\n' slurm "up: $(sinfo -h -N -o '%N=%t' | sort -u | tr '\n' ' ')"
  else
    printf '%-14s %s\n' slurm "down"; rc=1
  fi
  curl -fsS -o /dev/null --max-time 3 "http://127.0.0.1:5000/v2/" 2>/dev/null || rc=1
  if [ "$SLURM_CI_RESTD" = 1 ]; then
    # any HTTP answer (401 without a token) means the daemon listens
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://$SLURM_CI_RESTD_LISTEN/openapi/v3" 2>/dev/null || true)
    if [ -n "$code" ] && [ "$code" != 000 ]; then
      printf '%-14s %s\n' slurmrestd "up: http://$SLURM_CI_RESTD_LISTEN (HTTP $code without a token)"
    else
      printf '%-14s %s\n' slurmrestd "down"; rc=1
    fi
  fi
  [ -s "$ENV_FILE" ] || { printf '%-14s %s\n' env-file "missing ($ENV_FILE)"; rc=1; }
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
