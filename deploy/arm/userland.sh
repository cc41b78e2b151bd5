#!/bin/sh
# Build (or reuse) a cached Debian userland for an ARM architecture, as a zstd tarball.
#
#     deploy/arm/userland.sh arm64 bookworm      # prints the tarball's path
#     deploy/arm/userland.sh armhf bookworm
#     deploy/arm/userland.sh armhf trixie
#
# The tarball holds a minbase Debian with python3 and the Debian packages the device
# install uses on that release (see PACKAGES below); pip adds the rest from PyPI when a
# test installs edge-sdk into it. Everything comes from the Debian mirror apt already
# uses on this machine. The cache lives in $EDGE_SDK_CACHE (default
# ~/.cache/edge-sdk/userlands); each tarball has a .sha256 beside it, checked before
# reuse, and its name carries a digest of this recipe, so a changed package list builds
# a new one. Needs root, mmdebstrap, qemu-user-static and binfmt-support (installed with
# apt-get when missing); mounts binfmt_misc and enables the qemu handler when needed.
set -eu

arch=${1:?usage: userland.sh ARCH SUITE (arm64|armhf, bookworm|trixie)}
suite=${2:?usage: userland.sh ARCH SUITE}
cache=${EDGE_SDK_CACHE:-$HOME/.cache/edge-sdk/userlands}

base=python3,python3-venv,ca-certificates
case "$arch/$suite" in
    arm64/bookworm) packages=$base; qemu=aarch64 ;;
    # PyPI has no armv7 wheels for numpy, psutil or cryptography: Debian's, seen by the venv.
    armhf/bookworm) packages=$base,python3-numpy,python3-psutil,python3-cryptography; qemu=arm ;;
    # trixie also packages onnxruntime (1.21) for armhf.
    armhf/trixie) packages=$base,python3-numpy,python3-psutil,python3-cryptography,python3-onnxruntime; qemu=arm ;;
    *) echo "userland.sh: no recipe for $arch/$suite (arm64/bookworm, armhf/bookworm, armhf/trixie)" >&2; exit 2 ;;
esac

# The Debian mirror apt uses here (deb822 or one-line sources).
mirror=$(sed -n 's/^URIs: *\([^ ]*debian\/*\)$/\1/p; s/^deb  *\(http[^ ]*debian\/*\) .*/\1/p' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}

recipe=$(printf '%s %s %s %s\n' "$arch" "$suite" "$packages" "$mirror" | sha256sum | cut -c1-12)
tarball=$cache/debian-$suite-$arch-$recipe.tar.zst

log() { echo "userland.sh: $*" >&2; }

need_tools() {
    missing=
    command -v mmdebstrap >/dev/null 2>&1 || missing="$missing mmdebstrap"
    # mmdebstrap refuses a foreign architecture without arch-test ("install arch-test ...")
    command -v arch-test >/dev/null 2>&1 || missing="$missing arch-test"
    command -v "qemu-$qemu-static" >/dev/null 2>&1 || missing="$missing qemu-user-static"
    command -v update-binfmts >/dev/null 2>&1 || missing="$missing binfmt-support"
    command -v zstd >/dev/null 2>&1 || missing="$missing zstd"
    if [ -n "$missing" ]; then
        log "installing$missing"
        DEBIAN_FRONTEND=noninteractive apt-get -y -q install --no-install-recommends $missing >&2
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ]; then
        update-binfmts --enable "qemu-$qemu" >&2
    fi
}

[ "$(id -u)" = 0 ] || { log "needs root (mmdebstrap, binfmt_misc, chroot)"; exit 2; }
need_tools

if [ -f "$tarball" ] && [ -f "$tarball.sha256" ]; then
    if (cd "$cache" && sha256sum --check --status "$(basename "$tarball").sha256"); then
        log "reusing $tarball"
        echo "$tarball"
        exit 0
    fi
    log "$tarball does not match its checksum: building it again"
fi

mkdir -p "$cache"
partial=$tarball.partial.$$
trap 'rm -f "$partial" "$partial.tar"' EXIT INT TERM
started=$(date +%s)
log "building debian $suite $arch from $mirror (packages: $packages)"
# Two steps, not a pipe: sh has no pipefail, and a failed mmdebstrap piped into zstd
# once left a 13-byte "userland" in the cache with its checksum.
mmdebstrap --quiet --arch="$arch" --variant=minbase --include="$packages" \
    --format=tar "$suite" "$partial.tar" "$mirror"
zstd -q -T0 -3 --rm -o "$partial" "$partial.tar"
mv "$partial" "$tarball"
(cd "$cache" && sha256sum "$(basename "$tarball")" > "$(basename "$tarball").sha256")
log "built $tarball in $(( $(date +%s) - started )) s"
echo "$tarball"
