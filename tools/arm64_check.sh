#!/usr/bin/env bash
# The edge agent on arm64, checked on an x86 machine: an arm64 Debian bookworm userland (what
# Raspberry Pi OS 12 is) run under qemu user-mode emulation, where `pip install '.[edge]'` must
# install from aarch64 wheels only (no torch, nothing built for another machine), and where the
# arm64 agent streams real CIFAR-10 frames to an x86 `edgesplit serve` on loopback; its answers
# are compared with the x86 agent's on the same frames (tools/arm64_agent.py says how and why).
#
# Emulated times say nothing about a real Pi: they are printed as facts about this check, never
# benchmarks. Needs root (chroot, mounts). Exit codes: 0 pass, 1 fail, 77 skipped (the reason is
# printed: no binfmt_misc here, or no network to the apt mirror or PyPI).
#
# Settings (environment): EDGESPLIT_ARM64_CACHE (the rootfs cache, default
# ~/.cache/edgesplit/arm64-rootfs), ARM64_FRAMES (64), ARM64_NICE (niceness of the build and the
# emulated steps, 19), ARM64_EXTRA (requirement specs installed beside '.[edge]', e.g. to try a
# candidate dependency), ARM64_PIP_INDEX_URL (default PyPI), EDGESPLIT_DATA (the shared data
# folder), PYTHON (the host's edgesplit venv python, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
FRAMES=${ARM64_FRAMES:-64}
NICE="nice -n ${ARM64_NICE:-19}"
CACHE=${EDGESPLIT_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgesplit/arm64-rootfs}
DATA=${EDGESPLIT_DATA:-$REPO/../shared/data}
SHARD=$DATA/cifar10-jpeg/test-00000.tar.gz
PY=${PYTHON:-$REPO/.venv/bin/python}
BUNDLE=models/cifar10-resnet20-bottlefit
SUITE=bookworm
# What goes into the rootfs; any change here (or in the apt sources or mmdebstrap's version) makes
# a new cache key, so a stale rootfs is never reused.
RECIPE_VERSION=1
INCLUDE=python3,python3-venv
DPKG_OPTS=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-exclude=/usr/share/locale/*')
CHECK_DIR=/opt/edgesplit-check # inside the rootfs: this run's source copy, venv, frames, results

say() { echo "arm64_check: $*"; }
skip() {
  echo "arm64_check: SKIP: $*"
  exit 77
}
die() {
  echo "arm64_check: FAIL: $*" >&2
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)

[ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m): this check emulates aarch64 on an x86_64 host"
[ "$(id -u)" = 0 ] || skip "not root: cannot mount binfmt_misc nor chroot"
[ -x "$PY" ] || die "no edgesplit venv at $PY (run tools/setup.sh)"
[ -f "$SHARD" ] || die "no CIFAR-10 test shard at $SHARD (set EDGESPLIT_DATA)"

# -- network: a missing route is a reason to skip; anything after a positive probe is a failure --
SOURCES=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] && SOURCES+=("$f")
done
[ ${#SOURCES[@]} -gt 0 ] || die "no apt sources on this machine"
MIRROR_URI=$(sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
  -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\)[[:space:]].*/\2/p' "${SOURCES[@]}" | head -n1)
[ -n "$MIRROR_URI" ] || die "cannot read a mirror URI from ${SOURCES[*]}"
INDEX_URL=${ARM64_PIP_INDEX_URL:-https://pypi.org/simple}
probe() { # URL -> 0 when any HTTP answer came back
  "$PY" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=20).close()
except urllib.error.HTTPError:
    pass  # the server answered: the network is there
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
EOF
}
probe "$MIRROR_URI/dists/$SUITE/Release" || skip "no network to the apt mirror $MIRROR_URI"
probe "$INDEX_URL/onnxruntime/" || skip "no network to the package index $INDEX_URL"

# -- tools and binfmt_misc ----------------------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v arch-test >/dev/null || need+=(arch-test)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  $NICE apt-get update -q >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $NICE apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null ||
    die "apt-get install ${need[*]} failed"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
    skip "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc (an unprivileged container?)"
fi
if [ "$(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" != enabled ]; then
  [ -w /proc/sys/fs/binfmt_misc/register ] || skip "binfmt_misc is mounted read-only: cannot register qemu-aarch64"
  update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
[ "$(arch-test arm64 2>&1)" = "arm64: ok" ] || die "arch-test: this machine cannot run arm64 binaries: $(arch-test arm64 2>&1)"

# -- the rootfs, cached by a hash of what goes into it --------------------------------------------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9 # one run at a time uses the cache (the mounts below live inside it)
KEY=$(
  {
    echo "$RECIPE_VERSION $SUITE arm64 minbase $INCLUDE ${DPKG_OPTS[*]}"
    mmdebstrap --version
    cat "${SOURCES[@]}"
  } | sha256sum | cut -c1-16
)
ENTRY=$CACHE/$KEY
ROOT=$ENTRY/rootfs
mounts_under() { awk -v r="$1" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r; }
unmount_all() { # everything under this key: its rootfs and a half-built rootfs.tmp (mmdebstrap mounts too)
  local m
  for m in $(mounts_under "$ENTRY"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
}
# Deleting never crosses into a mount (a bind of /dev or /proc left by a killed run): check, and
# --one-file-system as well.
rm_tree() {
  [ -z "$(mounts_under "$1")" ] || die "mounts remain under $1: not deleting it"
  rm -rf --one-file-system "$1"
}
unmount_all # left by a run that was killed (we hold the lock: nobody else uses them)
T0=$(now)
if [ -f "$ENTRY/ok" ]; then
  say "rootfs cache hit: $ROOT"
else
  say "building the arm64 $SUITE rootfs into $ENTRY (mmdebstrap, a few minutes)"
  rm_tree "$ENTRY"
  mkdir -p "$ENTRY"
  mirrors=()
  for f in "${SOURCES[@]}"; do mirrors+=("$f"); done
  if ! $NICE mmdebstrap --quiet --arch=arm64 --variant=minbase --include="$INCLUDE" "${DPKG_OPTS[@]}" \
    "$SUITE" "$ENTRY/rootfs.tmp" "${mirrors[@]}" >"$ENTRY/mmdebstrap.log" 2>&1; then
    tail -n 30 "$ENTRY/mmdebstrap.log" >&2
    die "mmdebstrap failed (log: $ENTRY/mmdebstrap.log)"
  fi
  mv "$ENTRY/rootfs.tmp" "$ROOT"
  touch "$ENTRY/ok"
  say "timing rootfs_build_s=$(since "$T0") size_mb=$(du -sm "$ROOT" | cut -f1)"
  for old in "$CACHE"/????????????????; do # other keys are stale recipes: free their space
    if [ -d "$old" ] && [ "$old" != "$ENTRY" ] && [ -z "$(mounts_under "$old")" ]; then rm_tree "$old"; fi
  done
fi
[ -x "$ROOT/usr/bin/python3" ] || die "the cached rootfs at $ROOT has no python3: delete $ENTRY"

# -- this run's tree inside the rootfs, and the mounts ---------------------------------------------
W=$ROOT$CHECK_DIR
cleanup() {
  local rc=$?
  unmount_all
  if [ -n "$(mounts_under "$ROOT")" ]; then
    echo "arm64_check: mounts remain under $ROOT; not deleting $W" >&2
  else
    rm -rf --one-file-system "$W"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf --one-file-system "$W"
mkdir -p "$W/src" "$W/out"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # what the repository holds (tracked and new files, not what git ignores), as pip would see a
  # checkout; a tracked file deleted in the working tree is left out
  git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$W/src" -xf -
else
  tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./build -cf - . | tar -C "$W/src" -xf -
fi
# The host's resolver and CA bundle (the host may reach PyPI through a proxy with its own CA). rm
# first: were either a symlink in the rootfs, cp would write through it, possibly onto the host.
rm -f "$ROOT/etc/resolv.conf" "$ROOT/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
CERT_ENV=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$ROOT/etc/ssl/certs"
  cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  CERT_ENV=(SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
fi # else pip uses the CA bundle it carries
# An aarch64 /proc/cpuinfo, one Cortex-A72 (Raspberry Pi 4) entry per CPU the host's /sys lists:
# ONNX Runtime's CPU detection crashes when it reads the host's x86 cpuinfo under emulation.
CPUINFO=$W/cpuinfo
: >"$CPUINFO"
for ((i = 0; i < $(nproc --all); i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >>"$CPUINFO"
done
mount -t proc proc "$ROOT/proc"
mount --bind "$CPUINFO" "$ROOT/proc/cpuinfo"
mount --bind /sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
# A clean environment inside: the host's pip settings (its x86 wheel folders, constraints) must not
# leak in, and pip keeps no cache in the cached rootfs.
IN=(chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 OMP_NUM_THREADS=1
  "${CERT_ENV[@]}" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_INDEX_URL=$INDEX_URL
  ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} ${no_proxy:+no_proxy=$no_proxy})
[ "$("${IN[@]}" /usr/bin/uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"

# -- pip install '.[edge]': aarch64 wheels only ---------------------------------------------------
# --only-binary: a dependency without an aarch64 wheel fails here, loudly and at once, rather than
# compiling for an hour under emulation (and on every Pi). The project itself is built from source.
T0=$(now)
say "pip install '.[edge]' in the arm64 venv"
$NICE "${IN[@]}" /usr/bin/python3 -m venv "$CHECK_DIR/venv"
# ARM64_EXTRA: more requirements to try beside the extra (say, a candidate edge dependency).
# shellcheck disable=SC2086  # a list of requirement specs, split on spaces on purpose
if ! $NICE "${IN[@]}" "$CHECK_DIR/venv/bin/python" -m pip install --no-compile --only-binary=:all: \
  "$CHECK_DIR/src[edge]" ${ARM64_EXTRA:-} >"$W/pip.log" 2>&1; then
  tail -n 30 "$W/pip.log" >&2
  die "pip install '.[edge]' from aarch64 wheels failed (an edge dependency without an aarch64 wheel?)"
fi
grep -E '^(Collecting|Successfully installed)|\.whl' "$W/pip.log" | sed 's/^/  /' || true
say "timing pip_install_s=$(since "$T0")"
SITE=$(echo "$W"/venv/lib/python3*/site-packages)
"$PY" tools/arm64_agent.py wheels "$SITE" || die "the edge install is not pure aarch64 (or pulled torch)"

# -- the arm64 agent against the x86 server --------------------------------------------------------
"$PY" tools/arm64_agent.py slice --shard "$SHARD" --frames "$FRAMES" --out "$W/frames.tar"
# cryptography's aarch64 wheel and the console script: a bundle signed here verifies there.
cp -r "$BUNDLE" "$W/signed-bundle"
"$PY" -m edgesplit.cli bundle keygen --out "$W/keys" >/dev/null
"$PY" -m edgesplit.cli bundle sign "$W/signed-bundle" --key "$W/keys/publisher.ed25519" >/dev/null
T0=$(now)
$NICE "${IN[@]}" "$CHECK_DIR/venv/bin/edgesplit" bundle verify "$CHECK_DIR/signed-bundle" \
  --pubkey "$CHECK_DIR/keys/publisher.ed25519.pub" || die "the arm64 edgesplit could not verify a signed bundle"
say "timing emulated_bundle_verify_s=$(since "$T0")"
mkdir -p "$W/host"
$NICE "$PY" tools/arm64_agent.py check --bundle "$BUNDLE" --source "$W/frames.tar" --frames "$FRAMES" \
  --work "$W/host" --arm-prefix "${IN[*]} $CHECK_DIR/venv/bin/python $CHECK_DIR/src/tools/arm64_agent.py" \
  --arm-bundle "$CHECK_DIR/src/$BUNDLE" --arm-source "$CHECK_DIR/frames.tar" \
  --arm-out "$CHECK_DIR/out" --arm-out-host "$W/out" || die "the arm64 agent's answers do not match the x86 agent's"
say "timing total_s=$(since "$T_START")"
say "PASS"
