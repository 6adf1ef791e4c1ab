#!/bin/bash
# Runs inside the real-kernel VM (tools/vm-run starts it through `vng --exec`):
# loads the modules the tests need, then runs the requested command once.
#
# Usage (guest side): guest-init.sh RESULTS_DIR
# RESULTS_DIR is shared read-write with the host and holds, from the host:
#   argv   the command, NUL-separated     env   extra KEY=VALUE pairs, NUL-separated
# and, written here:
#   output.log  the command's stdout+stderr   rc     its exit code (written last)
#   guest.log   this script's own messages    timing boot/command seconds
# The VM's console is not a reliable channel (only with --verbose, mixed with
# kernel messages), so everything the host needs goes into RESULTS_DIR.
set -u

results=${1:?usage: guest-init.sh RESULTS_DIR}
project=$(cd "$(dirname "$0")/../.." && pwd)

exec 3>>"$results/guest.log"
log() { echo "vm-guest: $*" >&3; echo "vm-guest: $*" >/dev/console 2>/dev/null || true; }

# Guest uptime when this script starts = how long the emulated boot took.
boot_seconds=$(cut -d' ' -f1 /proc/uptime)
log "kernel $(uname -r) booted in ${boot_seconds}s"

# Without these the tests cannot run at all.
REQUIRED_MODULES=(xfrm_user esp4 esp6 authenc veth)
# Used by some tests or charon proposals; the kernel would autoload most of them
# on first use, loading them here only makes failures show up in one place.
OPTIONAL_MODULES=(
  ah4 ah6 ipcomp ipcomp6 xfrm4_tunnel xfrm6_tunnel xfrm_interface ip6_tunnel
  tunnel4 tunnel6 dummy
  gcm ccm ctr cbc seqiv echainiv chacha20poly1305 cmac xcbc
  sha256_generic sha512_generic
  nf_tables nft_compat xt_policy iptable_filter ip6table_filter
)
# One modprobe for all: each process start costs time under emulation.
if ! out=$(modprobe -a "${REQUIRED_MODULES[@]}" 2>&1); then
  log "modprobe of required modules failed: $out"
  log "check /lib/modules/$(uname -r) (made by tools/vm-kernel; remove .cache/vm and rerun it)"
  echo "vm-guest: cannot load required kernel modules (${REQUIRED_MODULES[*]}): $out" >"$results/output.log"
  echo 125 >"$results/rc"
  exit 0
fi
out=$(modprobe -a "${OPTIONAL_MODULES[@]}" 2>&1) || log "some optional modules did not load (continuing): $out"

# /run is a fresh tmpfs in the guest; ip netns keeps its namespace handles there.
mkdir -p /run/netns
ip link set lo up

# Speed: the root filesystem comes through 9p without caching, so every stat of a
# Python import is a round trip to the host (import pyroute2: ~10 s instead of
# ~3.5 s). tools/vm-run exports / a second time (tag ipsv-root); mounted with
# cache=loose it serves the trees Python reads, bound over the originals. Those
# trees do not change while the VM runs; without the export this is skipped.
FAST_ROOT=/run/ipsv-fast-root
python_home=$(sed -n 's/^home *= *//p' "$project/.venv/pyvenv.cfg" 2>/dev/null || true)
python_version=$(sed -n 's/^version *= *\([0-9]*\.[0-9]*\).*/\1/p' "$project/.venv/pyvenv.cfg" 2>/dev/null || true)
fast_trees=()
for d in "$project"/*/ "$project/.venv/" "${python_home%/bin}/lib/python$python_version/" /usr/lib/python3/; do
  d=${d%/}
  case "$d" in "$project/vm-results"|"$project/.cache") continue ;; esac
  [ -d "$d" ] && fast_trees+=("$d")
done
if mkdir -p "$FAST_ROOT" && mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 ipsv-root "$FAST_ROOT" 2>/dev/null; then
  for d in "${fast_trees[@]}"; do
    mount --bind "$FAST_ROOT$d" "$d" || log "cannot bind the cached view of $d (continuing uncached)"
  done
  log "cached read-only views: ${fast_trees[*]}"
else
  log "no ipsv-root export; Python trees stay uncached (slower)"
fi

# The project directory is the host's, shared read-only: nothing may write
# bytecode there, and temporary files go to the guest's own /tmp (an overlay in RAM).
export IPSV_REALKERNEL=1
export IPSV_VM_RESULTS=$results
export PYTHONDONTWRITEBYTECODE=1
export TMPDIR=/tmp
export HOME=/root
export LANG=C.UTF-8
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -s "$results/env" ]; then
  while IFS= read -r -d '' kv; do export "$kv"; done <"$results/env"
fi

mapfile -d '' argv <"$results/argv"
log "running in $project: ${argv[*]}"
start=$(date +%s.%N)
(cd "$project" && exec "${argv[@]}") >"$results/output.log" 2>&1 </dev/null
rc=$?
end=$(date +%s.%N)
command_seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
log "command exited $rc after ${command_seconds}s"

printf 'boot_seconds=%s\ncommand_seconds=%s\n' "$boot_seconds" "$command_seconds" >"$results/timing"
# rc last: its presence tells the host the command ran to completion.
echo "$rc" >"$results/rc.tmp" && mv "$results/rc.tmp" "$results/rc"
sync
exit 0
