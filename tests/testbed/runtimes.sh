#!/usr/bin/env bash
# provision-runtimes.sh - install and configure HPC container runtimes for CI.
#
# Scriptable, non-interactive and idempotent (re-running it is cheap and safe).
# Tested on Debian 12 (bookworm) x86_64 as root. Debian 13 is handled where the
# differences are known (see NOTES.md); that path was not run.
#
# What it provisions:
#   * a local OCI registry (Debian docker-registry 2.8) on 127.0.0.1:5000 (HTTP)
#     and 127.0.0.1:5443 (HTTPS, self-signed cert, trusted system-wide), with
#     both instances serving the same storage
#   * test images built without a Docker daemon (umoci + skopeo):
#       hpc/busybox:latest (Docker v2s2 manifest), hpc/busybox:oci (OCI manifest),
#       hpc/pydeb:latest (Debian minbase + python3; set HPCRT_PYTHON_IMAGE=0 to skip)
#     plus, for offline tests, an OCI layout dir, an oci-archive tar and a
#     docker-archive tar of each (under $HPCRT_ROOT/images/<name>/)
#   * the base images recipes/ name in FROM, from Debian packages: library/debian:12-slim
#   * multi-arch images: hpc/multi:latest (index: linux/amd64 + linux/arm64),
#     hpc/armonly:latest (one arm64 manifest) and hpc/armonly:index (index, arm64 only)
#   * Podman (Debian package) + a containers.conf drop-in that works around this
#     host's quirks (hybrid cgroups => runc; no CAP_SYS_RESOURCE => ulimits)
#   * Charliecloud (Debian package) + wrappers so ch-image uses /usr/bin/python3
#   * UDocker 1.3.17 from PyPI in a venv, with its engine tarball built locally
#     from Debian's proot/patchelf/runc (no download from the internet)
#   * Apptainer 1.4.x taken from Debian sid's .deb, unpacked into a relocatable
#     prefix; on glibc < 2.38 (Debian 12) it runs on a private copy of sid's
#     glibc (patchelf'd interpreter + rpath)
#   * an unprivileged test user (default hpcuser) with subuid/subgid ranges
#
# Usage: provision-runtimes.sh [STEP ...]
#   STEPS: all (default) | packages | host | user | registry | registry-auth | images |
#          base-images | multiarch-images | recipe-images | podman |
#          charliecloud | udocker | apptainer | verify | registry-stop | status
#   "all" = packages host user registry registry-auth images base-images multiarch-images podman recipe-images
#           charliecloud udocker apptainer verify
#
# Environment knobs (defaults in brackets):
#   HPCRT_ROOT [/var/lib/hpc-runtimes]      state: registry data, certs, images, logs
#   HPCRT_USER [hpcuser]                    unprivileged test user
#   HPCRT_REG_HTTP [127.0.0.1:5000]         plain-HTTP registry address
#   HPCRT_REG_HTTPS [127.0.0.1:5443]        TLS registry address
#   HPCRT_REG_AUTH [127.0.0.1:5444]         TLS registry that requires a login (htpasswd; its
#                                           own storage; user nsdf-ci, password in
#                                           $HPCRT_ROOT/registry/auth.password, root only)
#   HPCRT_TRUST_REGISTRY_CA [1]             add the registry cert to the system CA store
#   HPCRT_PYTHON_IMAGE [1]                  also build hpc/pydeb (debootstrap, ~30 s)
#   HPCRT_FORCE_IMAGES [0]                  rebuild the test images
#   HPCRT_APPTAINER_PREFIX [/opt/apptainer] unpacked Apptainer
#   HPCRT_APPTAINER_SUITE [sid]             Debian suite to take apptainer from
#   HPCRT_UDOCKER_HOME [/opt/udocker]       venv and engine tarball
#   HPCRT_UDOCKER_VERSION [1.3.17]
#   HPCRT_DEBIAN_MIRROR [http://deb.debian.org/debian]
#   HPCRT_SKIP [""]                         space-separated steps to skip
set -euo pipefail

HPCRT_ROOT=${HPCRT_ROOT:-/var/lib/hpc-runtimes}
HPCRT_USER=${HPCRT_USER:-hpcuser}
HPCRT_REG_HTTP=${HPCRT_REG_HTTP:-127.0.0.1:5000}
HPCRT_REG_HTTPS=${HPCRT_REG_HTTPS:-127.0.0.1:5443}
HPCRT_REG_AUTH=${HPCRT_REG_AUTH:-127.0.0.1:5444}
HPCRT_TRUST_REGISTRY_CA=${HPCRT_TRUST_REGISTRY_CA:-1}
HPCRT_PYTHON_IMAGE=${HPCRT_PYTHON_IMAGE:-1}
HPCRT_FORCE_IMAGES=${HPCRT_FORCE_IMAGES:-0}
HPCRT_APPTAINER_PREFIX=${HPCRT_APPTAINER_PREFIX:-/opt/apptainer}
HPCRT_APPTAINER_SUITE=${HPCRT_APPTAINER_SUITE:-sid}
HPCRT_UDOCKER_HOME=${HPCRT_UDOCKER_HOME:-/opt/udocker}
HPCRT_UDOCKER_VERSION=${HPCRT_UDOCKER_VERSION:-1.3.17}
HPCRT_DEBIAN_MIRROR=${HPCRT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HPCRT_SKIP=${HPCRT_SKIP:-}

export DEBIAN_FRONTEND=noninteractive
# The CI image puts pyenv/cargo shims first in PATH; system tools must win here.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)

log()  { printf '\033[1;34m[provision]\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33m[provision] WARNING:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31m[provision] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ "$(uname -m)" = x86_64 ] || warn "only tested on x86_64"

. /etc/os-release
DEBIAN_MAJOR=${VERSION_ID%%.*}
case "${VERSION_CODENAME:-}" in
  bookworm|trixie) ;;
  *) warn "untested distribution: ${PRETTY_NAME:-unknown}" ;;
esac

mkdir -p "$HPCRT_ROOT"/{registry,images,logs,run,apt}

# ---------------------------------------------------------------- helpers
ver_ge() { dpkg --compare-versions "$1" ge "$2"; }
host_glibc() { getconf GNU_LIBC_VERSION | awk '{print $2}'; }
# true if CAP_SYS_RESOURCE (bit 24) is missing from our effective set
lacks_cap_sys_resource() {
  local eff; eff=$(awk '/^CapEff:/{print $2}' /proc/self/status)
  (( (16#$eff >> 24 & 1) == 0 ))
}
port_up() { curl -fsS -o /dev/null --max-time 3 -k "$1/v2/" 2>/dev/null; }
# command prefix that runs something as the test user with a clean environment
as_user_cmd() { AS_USER=(runuser -u "$HPCRT_USER" -- env -i HOME="$(getent passwd "$HPCRT_USER" | cut -d: -f6)"
                USER="$HPCRT_USER" LOGNAME="$HPCRT_USER" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8); }
skip() { [[ " $HPCRT_SKIP " == *" $1 "* ]]; }

# ---------------------------------------------------------------- packages
step_packages() {
  log "apt packages"
  local pkgs=(
    ca-certificates curl openssl git python3 python3-venv libcap2-bin
    docker-registry skopeo umoci
    podman buildah runc crun conmon fuse-overlayfs uidmap slirp4netns apache2-utils
    golang-github-containers-common containernetworking-plugins catatonit
    charliecloud-runtime charliecloud-builders
    proot patchelf
    busybox-static squashfs-tools squashfuse fuse3 fuse2fs gocryptfs
    debootstrap libseccomp2 libsqlite3-0 e2fsprogs cryptsetup-bin
  )
  # passt/pasta is podman 5's default rootless network on Debian 13
  [ "$DEBIAN_MAJOR" -ge 13 ] 2>/dev/null && pkgs+=(passt)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    "${APT[@]}" update -qq
    # NB: on Debian 12 charliecloud-builders Depends on docker.io (+containerd);
    # the daemon is never started. Debian 13's 0.38 dropped that dependency.
    "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
  else
    log "all packages present"
  fi
}

# ---------------------------------------------------------------- host fixups
step_host() {
  log "host fixups (device permissions)"
  # Without udev, /dev/fuse and /dev/net/tun are 0600 root. Unprivileged FUSE
  # (squashfuse for ch-run/apptainer, fuse-overlayfs) and slirp4netns need 0666,
  # which is what udev sets on a normal Debian.
  [ -c /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 || warn "no /dev/fuse"
  [ -c /dev/fuse ] && chmod 0666 /dev/fuse
  mkdir -p /dev/net
  [ -c /dev/net/tun ] || mknod -m 0666 /dev/net/tun c 10 200 || warn "no /dev/net/tun"
  [ -c /dev/net/tun ] && chmod 0666 /dev/net/tun
  local n; n=$(cat /proc/sys/user/max_user_namespaces 2>/dev/null || echo 0)
  [ "$n" -gt 0 ] || warn "user namespaces disabled (max_user_namespaces=$n): rootless modes will fail"
  if [ -e /proc/sys/kernel/unprivileged_userns_clone ] && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" = 0 ]; then
    sysctl -w kernel.unprivileged_userns_clone=1 || warn "cannot enable unprivileged userns"
  fi
  losetup -f >/dev/null 2>&1 || warn "no free loop device: root apptainer will fall back to squashfuse"
}

# ---------------------------------------------------------------- user
step_user() {
  log "test user $HPCRT_USER"
  id "$HPCRT_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$HPCRT_USER"
  local f start
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$HPCRT_USER:" "$f"; then
      start=$(awk -F: 'BEGIN{m=100000} {e=$2+$3; if (e>m) m=e} END{print m}' "$f")
      echo "$HPCRT_USER:$start:65536" >> "$f"
    fi
  done
}

# ---------------------------------------------------------------- registry
REG="$HPCRT_ROOT/registry"
write_registry_config() {  # $1=name $2=addr $3=tls(0/1)
  local cfg="$REG/$1.yml"
  {
    echo "version: 0.1"
    echo "log:"
    echo "  level: warn"
    echo "  accesslog:"
    echo "    disabled: true"
    echo "storage:"
    echo "  cache:"
    echo "    blobdescriptor: inmemory"
    echo "  filesystem:"
    echo "    rootdirectory: $REG/data"
    echo "  delete:"
    echo "    enabled: true"
    echo "http:"
    echo "  addr: $2"
    echo "  secret: hpc-ci-not-a-secret"
    if [ "$3" = 1 ]; then
      echo "  tls:"
      echo "    certificate: $REG/tls.crt"
      echo "    key: $REG/tls.key"
    fi
    echo "  headers:"
    echo "    X-Content-Type-Options: [nosniff]"
  } > "$cfg.tmp"
  mv "$cfg.tmp" "$cfg"
}
start_registry() {  # $1=name $2=url
  local pidf="$HPCRT_ROOT/run/registry-$1.pid"
  if port_up "$2"; then log "registry $1 already answers at $2"; return; fi
  log "starting registry $1 at $2"
  setsid nohup docker-registry serve "$REG/$1.yml" >>"$HPCRT_ROOT/logs/registry-$1.log" 2>&1 </dev/null &
  echo $! > "$pidf"
  for _ in $(seq 50); do port_up "$2" && return; sleep 0.2; done
  die "registry $1 did not come up (see $HPCRT_ROOT/logs/registry-$1.log)"
}
step_registry() {
  log "local registry"
  mkdir -p "$REG/data"
  if [ ! -s "$REG/tls.crt" ]; then
    local host=${HPCRT_REG_HTTPS%:*}
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$host" \
      -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      -keyout "$REG/tls.key" -out "$REG/tls.crt" 2>/dev/null
    chmod 0644 "$REG/tls.crt"; chmod 0600 "$REG/tls.key"
  fi
  if [ "$HPCRT_TRUST_REGISTRY_CA" = 1 ]; then
    if ! cmp -s "$REG/tls.crt" /usr/local/share/ca-certificates/hpc-ci-registry.crt; then
      install -m 0644 "$REG/tls.crt" /usr/local/share/ca-certificates/hpc-ci-registry.crt
      update-ca-certificates >/dev/null
    fi
    install -D -m 0644 "$REG/tls.crt" "/etc/containers/certs.d/$HPCRT_REG_HTTPS/ca.crt"
  fi
  write_registry_config http "$HPCRT_REG_HTTP" 0
  write_registry_config https "$HPCRT_REG_HTTPS" 1
  start_registry http "http://$HPCRT_REG_HTTP"
  start_registry https "https://$HPCRT_REG_HTTPS"
}
# a registry that requires a login (issue 10 item 5): the same software with htpasswd, on its
# own TLS port and storage, so push and pull with credentials are tested for real
auth_up() { [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 3 "https://$HPCRT_REG_AUTH/v2/")" = 401 ]; }
step_registry_auth() {
  log "registry that requires a login"
  local cfg="$REG/auth.yml" pidf="$HPCRT_ROOT/run/registry-auth.pid"
  mkdir -p "$REG/data-auth" "$HPCRT_ROOT/run" "$HPCRT_ROOT/logs"
  [ -s "$REG/tls.crt" ] || die "run the registry step first (it makes the TLS certificate)"
  if [ ! -s "$REG/auth.password" ]; then
    (umask 077; openssl rand -hex 16 > "$REG/auth.password")
  fi
  htpasswd -Bbc "$REG/htpasswd.tmp" nsdf-ci "$(cat "$REG/auth.password")" 2>/dev/null
  mv "$REG/htpasswd.tmp" "$REG/htpasswd"
  printf '%s\n' "version: 0.1" "log:" "  level: warn" "  accesslog:" "    disabled: true" \
    "storage:" "  filesystem:" "    rootdirectory: $REG/data-auth" "  delete:" "    enabled: true" \
    "auth:" "  htpasswd:" "    realm: nsdf-hpc-testbed" "    path: $REG/htpasswd" \
    "http:" "  addr: $HPCRT_REG_AUTH" "  secret: hpc-ci-not-a-secret" "  tls:" \
    "    certificate: $REG/tls.crt" "    key: $REG/tls.key" > "$cfg"
  if [ "$HPCRT_TRUST_REGISTRY_CA" = 1 ]; then
    install -D -m 0644 "$REG/tls.crt" "/etc/containers/certs.d/$HPCRT_REG_AUTH/ca.crt"
  fi
  if auth_up; then log "registry auth already answers at https://$HPCRT_REG_AUTH"; return; fi
  setsid nohup docker-registry serve "$cfg" >>"$HPCRT_ROOT/logs/registry-auth.log" 2>&1 </dev/null &
  echo $! > "$pidf"
  for _ in $(seq 50); do auth_up && return; sleep 0.2; done
  die "registry auth did not come up (see $HPCRT_ROOT/logs/registry-auth.log)"
}
step_registry_stop() {
  local n pidf
  for n in http https auth; do
    pidf="$HPCRT_ROOT/run/registry-$n.pid"
    [ -s "$pidf" ] || continue
    if kill -0 "$(cat "$pidf")" 2>/dev/null; then
      log "stopping registry $n (pid $(cat "$pidf"))"; kill "$(cat "$pidf")"
    fi
    rm -f "$pidf"
  done
}

# ---------------------------------------------------------------- images
IMG="$HPCRT_ROOT/images"
# export one image from the umoci build layout into every offline format
export_image() {  # $1=name
  local n=$1 d="$IMG/$1" src="oci:$IMG/build:$1"
  mkdir -p "$d"
  rm -rf "$d/oci" "$d/$n.oci.tar" "$d/$n.docker.tar" "$d/dt"
  skopeo copy -q "$src" "oci:$d/oci:latest"                      # single-image layout
  skopeo copy -q "$src" "oci-archive:$d/$n.oci.tar:latest"
  # docker-archive: skopeo writes <id>/layer.tar as a *symlink*; udocker 1.3.17
  # cannot load that, so re-pack with links resolved (classic `docker save` form).
  skopeo copy -q "$src" "docker-archive:$d/dt.tar:hpc/$n:latest"
  mkdir "$d/dt" && tar -C "$d/dt" -xf "$d/dt.tar"
  (cd "$d/dt" && tar --owner=0 --group=0 --numeric-owner -chf "$d/$n.docker.tar" -- *)
  rm -rf "$d/dt" "$d/dt.tar"
  chmod -R a+rX "$d"
}
push_image() {  # $1=name
  local n=$1 src="oci:$IMG/build:$1"
  skopeo copy -q --dest-tls-verify=false --format v2s2 "$src" "docker://$HPCRT_REG_HTTP/hpc/$n:latest"
  skopeo copy -q --dest-tls-verify=false --format oci  "$src" "docker://$HPCRT_REG_HTTP/hpc/$n:oci"
  # nsdf-hpc: NSDF's own naming (nsdf/NAME:vX.Y.Z), and docker.io names under
  # library/ so the registry doubles as a site mirror for docker.io (no internet
  # here; the README's main command pulls "busybox" through this mirror).
  skopeo copy -q --dest-tls-verify=false --format v2s2 "$src" "docker://$HPCRT_REG_HTTP/nsdf/$n:v1.0.0"
  skopeo copy -q --dest-tls-verify=false --format v2s2 "$src" "docker://$HPCRT_REG_HTTP/library/$n:latest"
}
registry_has() { skopeo inspect --tls-verify=false --raw "docker://$HPCRT_REG_HTTP/library/$1:latest" >/dev/null 2>&1; }
umoci_config() {  # $1=name $2=cmd
  umoci config --image "$IMG/build:$1" --author hpc-ci --architecture amd64 --os linux \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.workingdir / --config.cmd "$2"
}
build_busybox() {
  local b="$IMG/bundle-busybox" R
  rm -rf "$b"
  umoci new --image "$IMG/build:busybox"
  umoci unpack --image "$IMG/build:busybox" "$b" >/dev/null
  R="$b/rootfs"
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,root,home,proc,sys,dev,mnt,tmp,var/tmp,data}
  chmod 1777 "$R/tmp" "$R/var/tmp"
  cp /bin/busybox "$R/bin/busybox"
  local a
  for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
  echo 'hello from busybox image' > "$R/etc/hello.txt"
  umoci repack --image "$IMG/build:busybox" "$b" >/dev/null
  umoci_config busybox /bin/sh
  rm -rf "$b"
}
build_pydeb() {
  local b="$IMG/bundle-pydeb" rootfs="$IMG/pydeb-rootfs"
  rm -rf "$b" "$rootfs"
  log "debootstrap minbase bookworm + python3-minimal (~30 s)"
  debootstrap --variant=minbase --include=python3-minimal bookworm "$rootfs" "$HPCRT_DEBIAN_MIRROR" \
    > "$HPCRT_ROOT/logs/debootstrap.log" 2>&1 || die "debootstrap failed (see logs/debootstrap.log)"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
         "$rootfs"/usr/share/info/*
  mkdir -p "$rootfs/data"
  echo 'hello from pydeb image' > "$rootfs/etc/hello.txt"
  umoci new --image "$IMG/build:pydeb"
  umoci unpack --image "$IMG/build:pydeb" "$b" >/dev/null
  cp -a "$rootfs/." "$b/rootfs/"
  umoci repack --image "$IMG/build:pydeb" "$b" >/dev/null
  umoci_config pydeb python3
  rm -rf "$b" "$rootfs"
}
step_images() {
  log "test images"
  local names=(busybox) n
  [ "$HPCRT_PYTHON_IMAGE" = 1 ] && names+=(pydeb)
  [ -d "$IMG/build" ] || umoci init --layout "$IMG/build"
  for n in "${names[@]}"; do
    local rebuilt=0
    if [ "$HPCRT_FORCE_IMAGES" = 1 ] || ! umoci ls --layout "$IMG/build" | grep -x "$n" >/dev/null; then
      log "building image $n"
      umoci rm --image "$IMG/build:$n" 2>/dev/null || true
      "build_$n"
      umoci gc --layout "$IMG/build"
      rm -f "$IMG/$n/.exported"; rebuilt=1
    fi
    if [ ! -e "$IMG/$n/.exported" ]; then
      export_image "$n"; touch "$IMG/$n/.exported"
    fi
    if [ $rebuilt = 1 ] || ! registry_has "$n"; then
      log "pushing hpc/$n:{latest,oci} to $HPCRT_REG_HTTP"; push_image "$n"
    fi
  done
  chmod -R a+rX "$IMG"
}

# ---------------------------------------------------------------- base images
# The base images that recipes/ name in FROM, made here from Debian packages (debootstrap) and
# served under their docker.io name through the docker.io mirror (the registry's library/), so
# recipes build on this machine, which cannot reach docker.io. Debian's mirror stays reachable:
# a recipe's `apt-get install` works as it would on Docker Hub's image.
#   debian:12-slim  minbase bookworm (apt, no python), sources.list -> $HPCRT_DEBIAN_MIRROR,
#                   plus the host's local CA certificates (see build_base_debian)
BASE="$HPCRT_ROOT/base-images"
base_has() {  # $1=name:tag
  skopeo inspect --tls-verify=false --raw "docker://$HPCRT_REG_HTTP/library/$1" >/dev/null 2>&1
}
build_base_debian() {  # $1=layout tag $2=suite
  local tag=$1 suite=$2 b="$BASE/bundle-$1" rootfs="$BASE/rootfs-$1"
  rm -rf "$b" "$rootfs"
  log "debootstrap minbase $suite for debian:$tag (~30 s)"
  debootstrap --variant=minbase "$suite" "$rootfs" "$HPCRT_DEBIAN_MIRROR" \
    > "$HPCRT_ROOT/logs/debootstrap-$tag.log" 2>&1 || die "debootstrap failed (see logs/debootstrap-$tag.log)"
  # as Docker Hub's debian images: an empty apt cache and lists, no docs
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  # The CA certificates this host adds to its own trust (the testbed registry's, and any
  # TLS-inspecting proxy's on the way to PyPI or Debian): a site with such a proxy puts them in
  # its base images too, or `pip install` in a recipe fails its certificate check. A recipe's
  # `apt-get install ca-certificates` puts them in /etc/ssl/certs.
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -type f \
    -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \;
  umoci new --image "$BASE/layout:$tag"
  umoci unpack --image "$BASE/layout:$tag" "$b" >/dev/null
  cp -a "$rootfs/." "$b/rootfs/"
  umoci repack --image "$BASE/layout:$tag" "$b" >/dev/null
  umoci config --image "$BASE/layout:$tag" --author hpc-ci --architecture amd64 --os linux \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.cmd bash
  rm -rf "$b" "$rootfs"
}
step_base_images() {
  log "base images for recipes/ (served as docker.io names)"
  local ref tag
  for ref in debian:12-slim; do
    tag=${ref#debian:}
    if [ "$HPCRT_FORCE_IMAGES" != 1 ] && base_has "$ref"; then continue; fi
    mkdir -p "$BASE" "$HPCRT_ROOT/logs"
    [ -d "$BASE/layout" ] || umoci init --layout "$BASE/layout"
    if [ "$HPCRT_FORCE_IMAGES" = 1 ] || ! umoci ls --layout "$BASE/layout" | grep -x "$tag" >/dev/null; then
      umoci rm --image "$BASE/layout:$tag" 2>/dev/null || true
      build_base_debian "$tag" bookworm
      umoci gc --layout "$BASE/layout"
    fi
    log "pushing library/$ref to $HPCRT_REG_HTTP"
    skopeo copy -q --dest-tls-verify=false --format v2s2 "oci:$BASE/layout:$tag" \
      "docker://$HPCRT_REG_HTTP/library/$ref"
  done
}

# ---------------------------------------------------------------- multi-arch images
# Images for another architecture than this host's (issue 12: multi-arch), with real content:
#   hpc/multi:latest    an OCI image index: linux/amd64 (hpc/busybox's layers) and linux/arm64
#   hpc/armonly:latest  one arm64 image (a plain manifest, as `docker build` on arm64 pushes it)
#   hpc/armonly:index   an index whose only entry is linux/arm64
# The arm64 busybox is Debian's busybox-static:arm64 .deb, fetched with a private apt state
# (this host's dpkg architectures and apt lists are not touched); nothing arm64 ever runs here.
MULTI="$HPCRT_ROOT/multiarch"
multiarch_has() {
  local r
  for r in hpc/multi:latest hpc/armonly:latest hpc/armonly:index; do
    skopeo inspect --tls-verify=false --raw "docker://$HPCRT_REG_HTTP/$r" >/dev/null 2>&1 || return 1
  done
}
fetch_arm64_busybox() {  # -> $MULTI/busybox-static_arm64.deb
  local d="$MULTI/apt" suite
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  rm -rf "$d"; mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
  echo "deb $HPCRT_DEBIAN_MIRROR $suite main" > "$d/sources.list"
  local A=(-o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" -o Dir::State::status=/dev/null
           -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
           -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Acquire::Languages=none
           -o APT::Sandbox::User=root)
  "${APT[@]}" "${A[@]}" update -qq > "$HPCRT_ROOT/logs/multiarch-apt.log" 2>&1 \
    || die "apt update (arm64 lists of $suite) failed (see logs/multiarch-apt.log)"
  (cd "$d" && "${APT[@]}" "${A[@]}" download busybox-static:arm64 >> "$HPCRT_ROOT/logs/multiarch-apt.log" 2>&1) \
    || die "apt-get download busybox-static:arm64 failed (see logs/multiarch-apt.log)"
  mv "$d"/busybox-static_*_arm64.deb "$MULTI/busybox-static_arm64.deb"
  rm -rf "$d"
}
build_arm64_busybox() {  # the arm64 twin of build_busybox, in the $MULTI/layout:arm64 image
  local b="$MULTI/bundle-arm64" x="$MULTI/deb-arm64" R a
  rm -rf "$b" "$x"
  dpkg-deb -x "$MULTI/busybox-static_arm64.deb" "$x"
  umoci new --image "$MULTI/layout:arm64"
  umoci unpack --image "$MULTI/layout:arm64" "$b" >/dev/null
  R="$b/rootfs"
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,root,home,proc,sys,dev,mnt,tmp,var/tmp,data}
  chmod 1777 "$R/tmp" "$R/var/tmp"
  cp "$x/bin/busybox" "$R/bin/busybox"
  # the applet list of this host's busybox (the arm64 one cannot run here to say its own)
  for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
  echo 'hello from arm64 busybox image' > "$R/etc/hello.txt"
  umoci repack --image "$MULTI/layout:arm64" "$b" >/dev/null
  umoci config --image "$MULTI/layout:arm64" --author hpc-ci --architecture arm64 --os linux \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.workingdir / --config.cmd /bin/sh
  rm -rf "$b" "$x"
}
# add an image index "$1" to the OCI layout, listing the layout's images "$2"... (os/arch from
# each image's config); skopeo copy --all then pushes it with every entry
add_index() {  # $1=index name, $2...=image names in $MULTI/layout
  python3 - "$MULTI/layout" "$@" <<'PY'
import hashlib, json, os, sys
layout, name, images = sys.argv[1], sys.argv[2], sys.argv[3:]
def blob(d):
    return os.path.join(layout, "blobs", *d["digest"].split(":", 1))
idx_path = os.path.join(layout, "index.json")
idx = json.load(open(idx_path))
refs = {m.get("annotations", {}).get("org.opencontainers.image.ref.name"): m for m in idx["manifests"]}
entries = []
for image in images:
    m = refs[image]
    config = json.load(open(blob(json.load(open(blob(m)))["config"])))
    entries.append({"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"],
                    "platform": {"os": config["os"], "architecture": config["architecture"]}})
data = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": entries}, indent=2).encode()
digest = "sha256:" + hashlib.sha256(data).hexdigest()
with open(blob({"digest": digest}), "wb") as fh:
    fh.write(data)
idx["manifests"] = [m for m in idx["manifests"]
                    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != name]
idx["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
                         "size": len(data), "annotations": {"org.opencontainers.image.ref.name": name}})
with open(idx_path + ".tmp", "w") as fh:
    json.dump(idx, fh)
os.replace(idx_path + ".tmp", idx_path)
PY
}
step_multiarch_images() {
  log "multi-arch images (hpc/multi:latest, hpc/armonly:{latest,index})"
  if [ "$HPCRT_FORCE_IMAGES" != 1 ] && multiarch_has; then return 0; fi
  mkdir -p "$MULTI" "$HPCRT_ROOT/logs"
  [ -s "$MULTI/busybox-static_arm64.deb" ] || fetch_arm64_busybox
  rm -rf "$MULTI/layout"
  umoci init --layout "$MULTI/layout"
  build_arm64_busybox
  [ -d "$IMG/build" ] && umoci ls --layout "$IMG/build" | grep -x busybox >/dev/null \
    || die "the multi-arch images reuse hpc/busybox: run the images step first"
  skopeo copy -q "oci:$IMG/build:busybox" "oci:$MULTI/layout:amd64"
  add_index multi amd64 arm64
  add_index armonly-index arm64
  local dst="docker://$HPCRT_REG_HTTP/hpc"
  skopeo copy -q --all --dest-tls-verify=false "oci:$MULTI/layout:multi" "$dst/multi:latest"
  skopeo copy -q --all --dest-tls-verify=false "oci:$MULTI/layout:armonly-index" "$dst/armonly:index"
  skopeo copy -q --dest-tls-verify=false --format v2s2 "oci:$MULTI/layout:arm64" "$dst/armonly:latest"
  chmod -R a+rX "$MULTI"
}

# ---------------------------------------------------------------- recipe images
# Images built from recipes/ and served under their NSDF name, so examples run as a new user
# would run them (examples/executor_numpy.py uses nsdf/python:v1.0.0, Python 3 + numpy):
#   nsdf/python:v1.0.0  recipes/nsdf-python, built with podman from library/debian:12-slim
#                       (base-images; FROM is pointed at this registry, which is the docker.io
#                       mirror, because podman's own config has no mirror for docker.io);
#                       apt-get reaches Debian's mirror (~1-2 min the first time)
RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../recipes" 2>/dev/null && pwd || true)
step_recipe_images() {
  log "images built from recipes/ (nsdf/python:v1.0.0, nsdf/mpi:v1.0.0)"
  [ -n "$RECIPES_DIR" ] || die "recipes/ not found beside tests/testbed"
  local name ref tmp tag
  # python: for examples/; mpi: the MPI job of tests/integration/test_mpi.py on every runtime
  for name in python mpi; do
    ref="nsdf/$name:v1.0.0" tag="localhost/nsdf-testbed/$name:v1.0.0"
    if [ "$HPCRT_FORCE_IMAGES" != 1 ] && \
       skopeo inspect --tls-verify=false --raw "docker://$HPCRT_REG_HTTP/$ref" >/dev/null 2>&1; then
      continue
    fi
    mkdir -p "$HPCRT_ROOT/logs"
    tmp=$(mktemp -d)
    cp -a "$RECIPES_DIR/nsdf-$name/." "$tmp/"
    sed -i "s#^FROM docker.io/#FROM $HPCRT_REG_HTTPS/#" "$tmp/Dockerfile"
    podman build --pull=missing -t "$tag" -f "$tmp/Dockerfile" "$tmp" \
      > "$HPCRT_ROOT/logs/recipe-$name.log" 2>&1 || { rm -rf "$tmp"; die "podman build of recipes/nsdf-$name failed (see logs/recipe-$name.log)"; }
    rm -rf "$tmp"
    log "pushing $ref to $HPCRT_REG_HTTP"
    skopeo copy -q --dest-tls-verify=false --format v2s2 "containers-storage:$tag" "docker://$HPCRT_REG_HTTP/$ref"
    podman rmi --ignore "$tag" >/dev/null 2>&1 || true
  done
}

# ---------------------------------------------------------------- podman
step_podman() {
  log "podman configuration"
  mkdir -p /etc/containers/containers.conf.d /etc/containers/registries.conf.d
  cat > /etc/containers/registries.conf.d/50-hpc-ci.conf <<EOF
# written by provision-runtimes.sh: local CI registries
[[registry]]
location = "$HPCRT_REG_HTTP"
insecure = true
[[registry]]
location = "$HPCRT_REG_HTTPS"
insecure = $([ "$HPCRT_TRUST_REGISTRY_CA" = 1 ] && echo false || echo true)
EOF
  # native overlay for root and rootless (kernel >= 5.13); vfs copies the whole
  # image on every `podman run` (+0.25 s for a 100 MB image)
  if [ ! -e /etc/containers/storage.conf ]; then
    cat > /etc/containers/storage.conf <<'EOF'
# written by provision-runtimes.sh
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
  fi
  local conf=/etc/containers/containers.conf.d/50-hpc-ci.conf
  local probe="oci:$IMG/busybox/oci:latest"
  local runtime=crun ulimits="" cgmgr=cgroupfs
  [ -d /run/systemd/system ] && cgmgr=systemd
  if lacks_cap_sys_resource; then
    # podman (rootful) raises RLIMIT_NOFILE/NPROC to 1048576/4194304 by default,
    # which needs CAP_SYS_RESOURCE; cap them to what this host allows.
    local nofile; nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    ulimits="\"nofile=$nofile:$nofile\", \"nproc=32768:32768\""
  fi
  write_podman_conf() {
    cat > "$conf" <<EOF
# written by provision-runtimes.sh
[containers]
${ulimits:+default_ulimits = [$ulimits]}
[engine]
runtime = "$runtime"
cgroup_manager = "$cgmgr"
events_logger = "file"
EOF
  }
  write_podman_conf
  podman pull -q "$probe" >/dev/null 2>&1 || die "podman cannot read $probe"
  local img; img=$(podman pull -q "$probe")
  if ! podman run --rm --network=none "$img" true >/dev/null 2>&1; then
    # crun 1.8 refuses hybrid cgroup v1/v2 hosts ("cgroups in hybrid mode not supported")
    runtime=runc; write_podman_conf
    if ! podman run --rm --network=none "$img" true >/dev/null 2>&1; then
      ulimits="\"nofile=1024:1024\", \"nproc=1024:1024\""; write_podman_conf
      podman run --rm --network=none "$img" true || die "podman run fails even with runc + low ulimits"
    fi
  fi
  podman rmi -f "$img" >/dev/null 2>&1 || true
  log "podman runtime=$runtime ulimits=[${ulimits:-default}] cgroup_manager=$cgmgr"
}

# ---------------------------------------------------------------- charliecloud
step_charliecloud() {
  log "charliecloud wrappers"
  # ch-image/ch-run-oci start with `#!/usr/bin/env python3`; with pyenv or a venv
  # first in PATH they die with "No module named 'lark'". /usr/local/bin comes
  # before /usr/bin, so these wrappers pin the system interpreter.
  local t
  for t in ch-image ch-run-oci; do
    [ -x "/usr/bin/$t" ] || continue
    printf '#!/bin/sh\n# written by provision-runtimes.sh\nexec /usr/bin/python3 /usr/bin/%s "$@"\n' "$t" > "/usr/local/bin/$t.tmp"
    chmod 0755 "/usr/local/bin/$t.tmp"; mv "/usr/local/bin/$t.tmp" "/usr/local/bin/$t"
  done
}

# ---------------------------------------------------------------- udocker
step_udocker() {
  log "udocker $HPCRT_UDOCKER_VERSION"
  local h=$HPCRT_UDOCKER_HOME venv=$HPCRT_UDOCKER_HOME/venv
  mkdir -p "$h"
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
  if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("udocker"))' 2>/dev/null)" != "$HPCRT_UDOCKER_VERSION" ]; then
    "$venv/bin/pip" install -q "udocker==$HPCRT_UDOCKER_VERSION"
  fi
  ln -sfn "$venv/bin/udocker" /usr/local/bin/udocker
  # udocker always passes "-k <host kernel release>" to proot; with Debian's
  # proot 5.1.0 that kernel emulation breaks every glibc >= 2.33 guest
  # ("libc.so.6: cannot stat shared object: Invalid argument"; a static busybox
  # is unaffected). This wrapper drops "-k X" from proot's own options.
  local wrap="$h/proot-nokernel"
  cat > "$wrap.tmp" <<'WRAPPER'
#!/bin/sh
# proot wrapper for udocker (written by provision-runtimes.sh): drop "-k X"
# (kernel-release emulation) before "-r ROOTFS"; Debian proot 5.1.0's kompat
# code breaks glibc >= 2.33 guests. Everything else goes to /usr/bin/proot.
done=0; skip=0
for a do
  shift
  if [ $skip = 1 ]; then skip=0; continue; fi
  if [ $done = 0 ]; then
    case "$a" in
      -k) skip=1; continue ;;
      -k*|--kernel-release=*) continue ;;
      -r|--rootfs|--rootfs=*) done=1 ;;
    esac
  fi
  set -- "$@" "$a"
done
exec /usr/bin/proot "$@"
WRAPPER
  chmod 0755 "$wrap.tmp"; mv "$wrap.tmp" "$wrap"
  # The engine tarball normally comes from GitHub at `udocker install`. Build an
  # equivalent from Debian's binaries: udocker_dir/lib/VERSION must be >= the
  # release udocker requires (1.2.11 for udocker 1.3.17).
  local need; need=$("$venv/bin/python" -c 'from udocker.config import Config; print(Config.conf["tarball_release"])')
  local tb="$h/udocker-englib-$need-debian-r2.tar.gz"
  if [ ! -s "$tb" ]; then
    local t; t=$(mktemp -d)
    mkdir -p "$t/udocker_dir/bin" "$t/udocker_dir/lib" "$t/udocker_dir/doc"
    echo "$need" > "$t/udocker_dir/lib/VERSION"
    cp "$wrap" "$t/udocker_dir/bin/proot-x86_64-4_8_0"
    cp "$wrap" "$t/udocker_dir/bin/proot-x86_64"
    cp /usr/bin/patchelf "$t/udocker_dir/bin/patchelf-x86_64"
    cp /usr/sbin/runc "$t/udocker_dir/bin/runc-x86_64" 2>/dev/null || cp /usr/bin/runc "$t/udocker_dir/bin/runc-x86_64"
    echo "udockertools $need replacement built from Debian proot/patchelf/runc by provision-runtimes.sh" \
      > "$t/udocker_dir/doc/README.debian"
    tar -C "$t" --owner=0 --group=0 -czf "$tb" udocker_dir
    rm -rf "$t"; chmod 0644 "$tb"
  fi
  # /etc/udocker.conf is read by every user: auto-install from the local tarball,
  # never fetch the "messages" file from GitHub, and always use the wrapper (also
  # for udocker dirs that were installed from an older tarball).
  cat > /etc/udocker.conf <<EOF
# written by provision-runtimes.sh
[DEFAULT]
tarball = $tb
installinfo = /nonexistent/udocker-messages
use_proot_executable = $wrap
EOF
  rm -f "$h"/udocker-englib-*-debian.tar.gz   # superseded r1 tarball (plain proot)
}

# ---------------------------------------------------------------- apptainer
SIDAPT=()
apptainer_apt_init() {
  local a="$HPCRT_ROOT/apt/$HPCRT_APPTAINER_SUITE"
  mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $HPCRT_DEBIAN_MIRROR $HPCRT_APPTAINER_SUITE main" > "$a/sources.list"
  # private sources/lists/cache: the system's apt configuration is untouched
  SIDAPT=("${APT[@]}" -o "Dir::Etc::sourcelist=$a/sources.list" -o Dir::Etc::sourceparts=-
          -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" -o APT::Sandbox::User=root)
  if [ -z "$(find "$a/lists" -name '*Packages*' -mmin -1440 2>/dev/null)" ]; then
    "${SIDAPT[@]}" update -qq
  fi
  APTDEBS="$a/debs"
}
step_apptainer() {
  local P=$HPCRT_APPTAINER_PREFIX
  if [ -x "$P/usr/bin/apptainer" ] && "$P/usr/bin/apptainer" version >/dev/null 2>&1 && [ -e "$P/.provisioned" ]; then
    log "apptainer $("$P/usr/bin/apptainer" version) already at $P"
  else
    log "apptainer from Debian $HPCRT_APPTAINER_SUITE into $P"
    apptainer_apt_init
    local deb libcdeb need
    (cd "$APTDEBS" && rm -f ./*.deb && "${SIDAPT[@]}" download apptainer libc6 >/dev/null)
    deb=$(ls "$APTDEBS"/apptainer_*.deb); libcdeb=$(ls "$APTDEBS"/libc6_*.deb)
    need=$(dpkg-deb -f "$deb" Depends | grep -o 'libc6 (>= [^)]*)' | sed 's/.*>= //; s/)//')
    rm -rf "$P.new"; mkdir -p "$P.new"
    dpkg -x "$deb" "$P.new"
    # Relocation: a non-setuid apptainer derives its paths from its own location.
    # apptainer computes prefix=$P/usr, the starter computes prefix=$P/usr/lib
    # (libexecdir is usr/lib/x86_64-linux-gnu); both then look for etc/ and var/.
    ln -sfn ../etc "$P.new/usr/etc";    ln -sfn ../var "$P.new/usr/var"
    ln -sfn ../../etc "$P.new/usr/lib/etc"; ln -sfn ../../var "$P.new/usr/lib/var"
    mkdir -p "$P.new/var/lib/apptainer/mnt/session"
    if ! ver_ge "$(host_glibc)" "${need:-0}"; then
      log "host glibc $(host_glibc) < $need: bundling $(basename "$libcdeb") and patching ELF interpreter/rpath"
      mkdir -p "$P.new/glibc"; dpkg -x "$libcdeb" "$P.new/glibc"
      local G="$P/glibc/usr/lib/x86_64-linux-gnu" f
      [ -e "$P.new/glibc/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || G="$P/glibc/lib/x86_64-linux-gnu"
      while IFS= read -r f; do
        patchelf --print-interpreter "$f" >/dev/null 2>&1 || continue   # skip scripts/static
        patchelf --set-interpreter "$G/ld-linux-x86-64.so.2" \
                 --force-rpath --set-rpath "$G:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu" "$f"
      done < <(find "$P.new/usr/bin" "$P.new/usr/lib/x86_64-linux-gnu/apptainer" -type f -perm -u+x)
    fi
    rm -rf "$P.old"; [ -e "$P" ] && mv "$P" "$P.old"
    mv "$P.new" "$P"; rm -rf "$P.old"
    "$P/usr/bin/apptainer" version >/dev/null || die "unpacked apptainer does not start"
    touch "$P/.provisioned"
  fi
  ln -sfn "$P/usr/bin/apptainer" /usr/local/bin/apptainer
  # Root without some capability (here: CAP_SYS_RESOURCE) cannot use the
  # default "root default capabilities = full": the starter dies with
  # "Requesting capability set ... while permitted capability set is ...".
  local conf="$P/etc/apptainer/apptainer.conf"
  local bnd full; bnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
  full=$(cat /proc/sys/kernel/cap_last_cap 2>/dev/null || echo 40)
  if (( 16#$bnd != (1 << (full + 1)) - 1 )); then
    local caps; caps=$(capsh --decode="$bnd" 2>/dev/null | sed 's/.*=//' | tr a-z A-Z)
    sed -i 's/^root default capabilities = .*/root default capabilities = file/' "$conf"
    "$P/usr/bin/apptainer" capability add --user root "$caps" >/dev/null 2>&1 \
      || warn "apptainer capability add failed; root exec may need --no-privs"
    log "apptainer: root gets the host bounding set via capability.json (mode 'file')"
  fi
}

# ---------------------------------------------------------------- verify
VERIFY_FAIL=0
check() {  # $1=label, rest=command; output must contain $MARK (default: busybox hello)
  local label=$1; shift
  local out rc=0
  out=$(timeout 120 "$@" 2>&1) || rc=$?
  if [ $rc = 0 ] && grep -q "${MARK:-hello from busybox image}" <<<"$out"; then
    printf '  %-44s OK\n' "$label"
  else
    printf '  %-44s FAIL (rc=%s) %s\n' "$label" "$rc" "$(tail -c 300 <<<"$out" | tr '\n' ' ')"
    VERIFY_FAIL=1
  fi
}
step_verify() {
  log "smoke tests (cat /etc/hello.txt with a bind mount, env var, id)"
  local reg=$HPCRT_REG_HTTP u=$HPCRT_USER
  as_user_cmd
  local W; W=$(mktemp -d /tmp/hpcrt-verify.XXXXXX); chmod 0755 "$W"
  chown "$u" "$W"
  local bb="hpc/busybox:latest" cmd='cat /etc/hello.txt /data/x && echo FOO=$FOO && id'
  echo "bindfile" > "$W/x"; chmod 0644 "$W/x"
  # podman
  check "podman root (registry)" podman run --rm --network=none --pull=always -v "$W:/data:ro" -e FOO=bar "$reg/$bb" sh -c "$cmd"
  check "podman root (docker-archive)" sh -c "podman pull -q docker-archive:$IMG/busybox/busybox.docker.tar >/dev/null && podman run --rm --network=none -v $W:/data:ro docker.io/hpc/busybox:latest sh -c 'cat /etc/hello.txt'"
  check "podman rootless" "${AS_USER[@]}" sh -c "cd; podman run --rm --network=host --pull=always -v $W:/data:ro -e FOO=bar $reg/$bb sh -c '$cmd' 2>&1 | grep -v 'shared mount'"
  # charliecloud (uses the TLS registry: ch-image 0.31 only speaks https)
  local https=$HPCRT_REG_HTTPS chopt=""
  [ "$HPCRT_TRUST_REGISTRY_CA" = 1 ] || chopt="--tls-no-verify"
  check "charliecloud root" env -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE USER=root CH_IMAGE_STORAGE="$W/ch-root" CH_IMAGE_CACHE=disabled \
    sh -c "ch-image $chopt pull $https/$bb >/dev/null && ch-run -b $W:/data --set-env=FOO=bar $https/$bb -- sh -c '$cmd'"
  check "charliecloud user (dir + squashfs)" "${AS_USER[@]}" CH_IMAGE_STORAGE="$W/ch-user" CH_IMAGE_CACHE=disabled \
    sh -c "ch-image $chopt pull $https/$bb >/dev/null && ch-convert -i ch-image -o squash $https/$bb $W/bb.sqfs >/dev/null && ch-run -b $W:/data $W/bb.sqfs -- sh -c '$cmd'"
  # udocker
  check "udocker root (registry, P1/proot)" env UDOCKER_DIR="$W/ud-root" sh -c \
    "udocker --allow-root -q pull --registry=http://$reg $bb >/dev/null && udocker --allow-root -q run --rm -v $W:/data -e FOO=bar $bb sh -c '$cmd'"
  check "udocker user (docker-archive, P1/proot)" "${AS_USER[@]}" UDOCKER_DIR="$W/ud-user" sh -c \
    "udocker -q load -i $IMG/busybox/busybox.docker.tar >/dev/null && udocker -q run --rm -v $W:/data -e FOO=bar docker.io/$bb sh -c '$cmd'"
  if [ -e "$IMG/pydeb/pydeb.docker.tar" ]; then
    MARK="hello from pydeb image" check "udocker user (glibc image: python3)" "${AS_USER[@]}" UDOCKER_DIR="$W/ud-user" sh -c \
      "udocker -q load -i $IMG/pydeb/pydeb.docker.tar >/dev/null && udocker -q run --rm docker.io/hpc/pydeb:latest python3 -c 'print(open(\"/etc/hello.txt\").read())'"
  fi
  # apptainer
  check "apptainer root (registry -> SIF)" env APPTAINER_CACHEDIR="$W/ap-root" sh -c \
    "apptainer -s pull --no-https $W/bb-root.sif docker://$reg/$bb && apptainer -s exec -B $W:/data --env FOO=bar $W/bb-root.sif sh -c '$cmd'"
  check "apptainer user (registry -> SIF, userns)" "${AS_USER[@]}" APPTAINER_CACHEDIR="$W/ap-user" sh -c \
    "apptainer -s pull --no-https $W/bb-user.sif docker://$reg/$bb && apptainer -s exec -B $W:/data --env FOO=bar $W/bb-user.sif sh -c '$cmd'"
  check "apptainer user (docker-archive -> sandbox)" "${AS_USER[@]}" APPTAINER_CACHEDIR="$W/ap-user" sh -c \
    "apptainer -s build --sandbox $W/bb-sbx docker-archive:$IMG/busybox/busybox.docker.tar && apptainer -s exec $W/bb-sbx cat /etc/hello.txt"
  # rootless podman leaves a per-user "catatonit -P" pause process behind
  local pf; pf="/tmp/podman-run-$(id -u "$u")/libpod/tmp/pause.pid"
  if [ -s "$pf" ] && ps -o comm= -p "$(cat "$pf")" 2>/dev/null | grep catatonit >/dev/null; then
    kill "$(cat "$pf")" 2>/dev/null || true
  fi
  rm -rf "$W" 2>/dev/null || { chmod -R u+rwX "$W" 2>/dev/null; rm -rf "$W" || warn "could not remove $W"; }
  [ $VERIFY_FAIL = 0 ] || die "some smoke tests failed"
  log "all smoke tests passed"
}

step_status() {
  printf '%-14s %s\n' podman "$(podman --version 2>/dev/null || echo missing)"
  printf '%-14s %s\n' charliecloud "$(USER=root ch-run --version 2>&1 || echo missing)"
  printf '%-14s %s\n' udocker "$("$HPCRT_UDOCKER_HOME/venv/bin/python" -c 'import udocker; print(udocker.__version__)' 2>/dev/null || echo missing)"
  printf '%-14s %s\n' apptainer "$(apptainer --version 2>/dev/null || echo missing)"
  printf '%-14s %s\n' registry "$(port_up "http://$HPCRT_REG_HTTP" && echo "up http://$HPCRT_REG_HTTP" || echo down) / $(port_up "https://$HPCRT_REG_HTTPS" && echo "up https://$HPCRT_REG_HTTPS" || echo down)"
  printf '%-14s %s\n' registry-auth "$(auth_up && echo "up https://$HPCRT_REG_AUTH (login required)" || echo down)"
  printf '%-14s %s\n' images "$(ls -d "$IMG"/*/oci 2>/dev/null | tr '\n' ' ')"
}

# ---------------------------------------------------------------- main
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(all)
if [ "${steps[0]}" = all ]; then
  steps=(packages host user registry registry-auth images base-images multiarch-images podman recipe-images charliecloud udocker apptainer verify)
fi
for s in "${steps[@]}"; do
  if skip "$s"; then log "skipping $s"; continue; fi
  case "$s" in
    packages) step_packages ;;
    host) step_host ;;
    user) step_user ;;
    registry) step_registry ;;
    registry-auth) step_registry_auth ;;
    registry-stop) step_registry_stop ;;
    images) step_images ;;
    base-images) step_base_images ;;
    multiarch-images) step_multiarch_images ;;
    recipe-images) step_recipe_images ;;
    podman) step_podman ;;
    charliecloud) step_charliecloud ;;
    udocker) step_udocker ;;
    apptainer) step_apptainer ;;
    verify) step_verify ;;
    status) step_status ;;
    *) die "unknown step: $s" ;;
  esac
done
