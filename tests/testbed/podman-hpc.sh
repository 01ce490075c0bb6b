#!/usr/bin/env bash
# podman-hpc.sh up|status -- NERSC's podman-hpc on the testbed, from the package registries only.
#
# What `up` does (idempotent; about 20 s the first time, under 1 s after):
#   * apt: inotify-tools (fuse-overlayfs-wrap calls inotifywait), squashfuse, fuse-overlayfs,
#     runc, and liblz4-dev + zlib1g-dev to build mksquashfs;
#   * a *static* mksquashfs >= 4.6 (podman-hpc's migrate runs it inside the image with
#     -xattrs-exclude; Debian 12's dynamic 4.5.1 fails there), built from Debian 13's own
#     squashfs-tools source package, fetched by apt through a private deb-src list;
#   * podman-hpc from PyPI in a venv made with Debian's /usr/bin/python3 (readable and
#     runnable by every user), on PATH as /usr/local/bin/podman-hpc, with its helpers
#     fuse-overlayfs-wrap and hook_tool (podman-hpc looks them up on PATH);
#   * the site configuration a cluster would have: /etc/podman_hpc/podman_hpc.yaml (per-uid
#     storage under /var/tmp/podman-hpc, the static mksquashfs, the OCI hook).
# Facts and traps: ../shared/testbed/podman-hpc-NOTES.md. Must run as root.
set -Eeuo pipefail

VENV=${PODMANHPC_VENV:-/opt/podman-hpc}
PKG=${PODMANHPC_PACKAGE:-podman-hpc==1.2.2}
LIBDIR=/usr/local/lib/podman-hpc
MKSQ=$LIBDIR/mksquashfs.static
BUILD=${PODMANHPC_BUILD:-/var/tmp/podman-hpc-build}
CONF=/etc/podman_hpc
STATE=/var/tmp/podman-hpc
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive

log() { printf '[podman-hpc %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[podman-hpc] ERROR: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

packages() {
  local want=() p
  for p in inotify-tools squashfuse fuse-overlayfs runc liblz4-dev zlib1g-dev make gcc libc6-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || want+=("$p")
  done
  if [ ${#want[@]} -gt 0 ]; then
    log "apt: ${want[*]}"
    apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null
  fi
}

static_mksquashfs() {
  if [ -x "$MKSQ" ] && "$MKSQ" -version 2>/dev/null | grep -q "version 4\.[6-9]"; then return; fi
  log "building a static mksquashfs from Debian 13's squashfs-tools source package"
  rm -rf "$BUILD"; mkdir -p "$BUILD/lists/partial" "$BUILD/src"
  echo "deb-src http://deb.debian.org/debian trixie main" > "$BUILD/sources.list"
  local apt=(apt-get -q -o "Dir::Etc::SourceList=$BUILD/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$BUILD/lists")
  "${apt[@]}" update >/dev/null
  (cd "$BUILD/src" && "${apt[@]}" source --download-only squashfs-tools >/dev/null 2>&1)
  local orig; orig=$(ls "$BUILD"/src/squashfs-tools_*.orig.tar.gz | head -1)
  [ -n "$orig" ] || die "no squashfs-tools source package found"
  tar -C "$BUILD/src" -xzf "$orig"
  local dir; dir=$(ls -d "$BUILD"/src/squashfs-tools-*/squashfs-tools | head -1)
  make -C "$dir" -j"$(nproc)" LZ4_SUPPORT=1 EXTRA_LDFLAGS=-static mksquashfs >"$BUILD/make.log" 2>&1 \
    || { tail -20 "$BUILD/make.log" >&2; die "mksquashfs build failed"; }
  install -D -m 0755 "$dir/mksquashfs" "$MKSQ"
  "$MKSQ" -version | head -1 >&2
}

install_podman_hpc() {
  if [ ! -x "$VENV/bin/podman-hpc" ]; then
    log "pip: $PKG into $VENV"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$PKG"
  fi
  chmod -R a+rX "$VENV"
  local t
  for t in podman-hpc fuse-overlayfs-wrap hook_tool; do ln -sf "$VENV/bin/$t" "/usr/local/bin/$t"; done
}

site_config() {
  mkdir -p "$CONF" "$STATE"; chmod 1777 "$STATE"
  [ -d "$CONF/modules.d" ] || cp -r "$VENV"/etc/podman_hpc/modules.d "$CONF/"
  [ -s "$CONF/hooks.d/02-hook_tool.json" ] || "$VENV/bin/python" -m podman_hpc.configure_hooks --hooksd "$CONF/hooks.d" >/dev/null
  cat > "$CONF/podman_hpc.yaml.tmp" <<EOF
# podman-hpc site configuration, written by tests/testbed/podman-hpc.sh
podman_bin: "/usr/bin/podman"
mount_program: "$VENV/bin/fuse-overlayfs-wrap"
modules_dir: "$CONF/modules.d"
hooks_dir: "$CONF/hooks.d"
mksquashfs_bin: "$MKSQ"
graph_root_template: "$STATE/u{{ uid }}/storage"
run_root_template: "$STATE/u{{ uid }}/run"
config_home_template: "$STATE/u{{ uid }}/config"
EOF
  mv "$CONF/podman_hpc.yaml.tmp" "$CONF/podman_hpc.yaml"
}

status() {
  local v
  v=$(USER=root podman-hpc infohpc 2>/dev/null | grep -i "podman-hpc version" || true)
  if [ -x "$MKSQ" ] && [ -n "$v" ]; then echo "podman-hpc     ${v##*: } (mksquashfs $("$MKSQ" -version | head -1 | awk '{print $3}'))"
  else echo "podman-hpc     missing"; return 1; fi
}

case "${1:-up}" in
  up) packages; static_mksquashfs; install_podman_hpc; site_config; status ;;
  status) status ;;
  *) die "usage: $0 up|status" ;;
esac
