#!/usr/bin/env bash
# Build (once) a genuine aarch64 Python 3.11 userland that runs under qemu user-mode emulation, for testing packages.
#
#   scripts/aarch64_userland.sh [CACHE_DIR] [REQUIREMENTS]
#     CACHE_DIR     default ${EDGEPEFT_AARCH64_CACHE:-~/.cache/edgepeft-aarch64}
#     REQUIREMENTS  default edgepeft/deploy/requirements/linux-aarch64.txt (the pins `edgepeft package` ships)
#
# What it does (needs root for apt, as on CI and the dev machines):
#   1. apt-get install qemu-user-static (Debian 12 ships qemu 7.2) and `dpkg --add-architecture arm64`.
#   2. apt-get download the arm64 .debs of python3.11-minimal and the libraries it loads, and `dpkg -x` them into
#      CACHE_DIR/root: no chroot, no binfmt_misc, nothing installed for the host.
#   3. pip download the aarch64 cp311 wheels REQUIREMENTS pins (numpy, onnxruntime, safetensors), unzipped into
#      CACHE_DIR/site: the same file a package ships, so this also proves its pins resolve for linux-aarch64.
#   4. write CACHE_DIR/python: `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11` with CACHE_DIR/site on PYTHONPATH.
#
# The requirements pin onnxruntime 1.27.0: with qemu 7.2, aarch64 onnxruntime wheels up to 1.27 import and run a
# train step; 1.28 and newer die with SIGSEGV on import under this qemu (not known to fail on real hardware).
# Everything is cached: a second run with the same requirements only checks the stamp.
# Timings measured inside this userland are emulation timings, never device timings.
set -euo pipefail

CACHE_DIR="${1:-${EDGEPEFT_AARCH64_CACHE:-$HOME/.cache/edgepeft-aarch64}}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQUIREMENTS="${2:-${EDGEPEFT_AARCH64_REQUIREMENTS:-$SCRIPT_DIR/../edgepeft/deploy/requirements/linux-aarch64.txt}}"
[[ -f "$REQUIREMENTS" ]] || { echo "[aarch64-userland] no requirements file $REQUIREMENTS" >&2; exit 2; }
STAMP="python3.11 $(sha256sum < "$REQUIREMENTS" | cut -d' ' -f1)"

# The arm64 packages python3.11-minimal needs to start, import numpy/onnxruntime/safetensors and run ssl/zlib/ctypes.
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 zlib1g libexpat1 libffi8 libssl3
      libgcc-s1 libstdc++6 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0 libtinfo6 libncursesw6
      libreadline8 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
      libkeyutils1 libgomp1)

log() { echo "[aarch64-userland] $*" >&2; }

if [[ -f "$CACHE_DIR/READY" && "$(cat "$CACHE_DIR/READY")" == "$STAMP" && -x "$CACHE_DIR/python" ]]; then
    command -v qemu-aarch64-static >/dev/null || { log "qemu-aarch64-static vanished; reinstalling"; rm -f "$CACHE_DIR/READY"; }
fi
if [[ -f "$CACHE_DIR/READY" && "$(cat "$CACHE_DIR/READY")" == "$STAMP" ]]; then
    echo "$CACHE_DIR/python"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v qemu-aarch64-static >/dev/null; then
    log "installing qemu-user-static"
    apt-get install -y --no-install-recommends qemu-user-static >&2 || { apt-get update >&2 && apt-get install -y --no-install-recommends qemu-user-static >&2; }
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "adding the arm64 architecture to dpkg"
    dpkg --add-architecture arm64
    apt-get update >&2
elif ! apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1; then
    apt-get update >&2
fi

rm -rf "$CACHE_DIR/debs" && mkdir -p "$CACHE_DIR/debs"
rm -rf "$CACHE_DIR/root.tmp" "$CACHE_DIR/site.tmp"
mkdir -p "$CACHE_DIR/root.tmp" "$CACHE_DIR/site.tmp"

log "downloading ${#DEBS[@]} arm64 packages"
( cd "$CACHE_DIR/debs" && apt-get download "${DEBS[@]/%/:arm64}" >&2 )
for deb in "$CACHE_DIR"/debs/*.deb; do
    dpkg -x "$deb" "$CACHE_DIR/root.tmp"
done

log "downloading the aarch64 wheels pinned in $REQUIREMENTS"
rm -rf "$CACHE_DIR/wheels" && mkdir -p "$CACHE_DIR/wheels"
# --no-deps: the runtime needs only these three; onnxruntime's other requirements (protobuf, sympy, flatbuffers...)
# serve its tools, not `import onnxruntime` + InferenceSession. glibc in the Debian 12 userland is 2.36, so every
# manylinux_2_X tag up to 2_36 is listed (pip does not widen an explicit --platform to older glibc tags).
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    $(for v in 36 35 34 33 32 31 30 29 28 27 26 25 24 23 22 21 20 19 18 17; do printf -- '--platform manylinux_2_%s_aarch64 ' $v; done) \
    --platform manylinux2014_aarch64 -d "$CACHE_DIR/wheels" \
    -r "$REQUIREMENTS" >&2
for wheel in "$CACHE_DIR"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$CACHE_DIR/site.tmp"
done

rm -rf "$CACHE_DIR/root" "$CACHE_DIR/site"
mv "$CACHE_DIR/root.tmp" "$CACHE_DIR/root"
mv "$CACHE_DIR/site.tmp" "$CACHE_DIR/site"
cat > "$CACHE_DIR/python.tmp" <<WRAP
#!/bin/sh
# aarch64 python3.11 under qemu user-mode emulation; extra PYTHONPATH entries go first.
exec env PYTHONPATH="\${PYTHONPATH:+\$PYTHONPATH:}$CACHE_DIR/site" PYTHONNOUSERSITE=1 \\
    qemu-aarch64-static -L "$CACHE_DIR/root" "$CACHE_DIR/root/usr/bin/python3.11" "\$@"
WRAP
chmod +x "$CACHE_DIR/python.tmp"
mv "$CACHE_DIR/python.tmp" "$CACHE_DIR/python"

log "checking the userland"
"$CACHE_DIR/python" -c "import platform, numpy, onnxruntime, safetensors; assert platform.machine() == 'aarch64', platform.machine(); print(platform.machine(), numpy.__version__, onnxruntime.__version__, safetensors.__version__)" >&2
echo "$STAMP" > "$CACHE_DIR/READY"
echo "$CACHE_DIR/python"
