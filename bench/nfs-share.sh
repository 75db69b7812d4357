#!/usr/bin/env bash
# firn's file shares (NFSv3) against nfs-ganesha (FSAL VFS, a local directory on the same
# disk), one run, with the same client for both: examples/nfs_copy.rs (mount, then CREATE,
# 1 MiB UNSTABLE WRITEs and a COMMIT per file, over CONNECTIONS connections at once).
#
#   bench/nfs-share.sh
#   BIG=1G FILES=10000 FILE_SIZE=4K CONNECTIONS=4 bench/nfs-share.sh   (the defaults)
#   PAUSE_UPLOADS=1 bench/nfs-share.sh    (firn's uploads paused during the tree's copy: what
#                                          the door and engine reach without uploads competing)
#
# Needs root: it runs in a network namespace of its own (`unshare -n`, loopback only), where
# it starts Garage, firn, rpcbind and ganesha; ganesha 4.3 needs rpcbind, and its `-h` flag
# crashes in Debian's build, so it cannot be kept off other interfaces but by the namespace.
# Installs nfs-ganesha, nfs-ganesha-vfs and rpcbind (Debian) when missing.
#
# Each copy runs twice per server, in the order firn, ganesha, ganesha, firn, and each
# server's faster copy counts (see `alternate` below for why). Prints raw figures (both runs),
# then `ratio:` lines:
#   nfs-write-big     firn MiB/s / ganesha MiB/s copying one BIG file       (goal >= 0.8)
#   nfs-tree-files    firn files/s / ganesha files/s copying FILES files   (goal >= 0.8)
#   nfs-tree-bucket   seconds from the start of the tree's copy into firn until the bucket
#                     holds every file (the better of firn's two), over `rclone copy` of the
#                     same tree to the same Garage (the better of two; LOWER is better;
#                     goal <= 1.2)
#   nfs-tree-files-store-own-core   the tree again, Garage on one core and the server and
#                     client on the other (diagnostic: the store's work off the client's CPU)
#   nfs-cold-read     firn MiB/s / rclone MiB/s reading the BIG file back once evicted
#                     (firn fetching it from Garage block by block, read with libnfs's
#                     nfs-cat; rclone cat of the same object; diagnostic)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

big=${BIG:-1G}
files=${FILES:-10000}
file_size=${FILE_SIZE:-4K}
connections=${CONNECTIONS:-4}

if [ "${FIRN_BENCH_NETNS:-}" != 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "needs root (network namespace, ganesha)" >&2; exit 1; }
    if ! command -v ganesha.nfsd >/dev/null || ! command -v rpcbind >/dev/null ||
        ! command -v nfs-cat >/dev/null ||
        ! compgen -G '/usr/lib/*/ganesha/libfsalvfs.so' >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q nfs-ganesha nfs-ganesha-vfs rpcbind \
            libnfs-utils >/dev/null
    fi
    cargo build --release --quiet
    cargo build --release --quiet --example nfs_copy
    exec env FIRN_BENCH_NETNS=1 unshare -n bash "$0" "$@"
fi
ip link set lo up

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
work=$(mktemp -d -t firn-bench-nfs.XXXXXX)
cp "$target_dir/release/firn" "$work/firn"
cp "$target_dir/release/examples/nfs_copy" "$work/nfs_copy"
firn=$work/firn
firn_pid= ganesha_pid= rpcbind_pid=
cleanup() {
    for pid in $ganesha_pid $rpcbind_pid $firn_pid; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $ganesha_pid $rpcbind_pid $firn_pid; do wait "$pid" 2>/dev/null || true; done
    bash scripts/garage.sh stop "$work/garage" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

bash scripts/garage.sh start "$work/garage" >/dev/null
# shellcheck source=/dev/null
source "$work/garage/env"
calc() { python3 -c "print($*)"; }
now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

echo "firn $("$firn" --version | awk '{print $2}'), $(ganesha.nfsd -v 2>&1 | head -n 1 || echo ganesha), $(env -u AWS_CA_BUNDLE rclone version | head -n 1)"
echo "BIG=$big FILES=$files FILE_SIZE=$file_size CONNECTIONS=$connections; $(nproc) cores; work dir $work"

# The data: one large file, and a tree of small ones.
head -c "$big" /dev/urandom >"$work/big.bin"
mkdir "$work/tree"
python3 - "$work/tree" "$files" "$(numfmt --from=iec "$file_size")" <<'PY'
import os, sys
root, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    with open(os.path.join(root, f"f{i:06d}.dat"), "wb") as f:
        f.write(os.urandom(size))
PY
big_bytes=$(stat -c %s "$work/big.bin")

pin_client=(taskset -c 0) # the client of the store-own-core copies
copy() { # addr export local dir -> "files bytes seconds"
    drop_caches
    "$work/nfs_copy" "$1" "$2" "$3" "$4" "$connections"
}

# --- ganesha, started first: it waits while firn copies, and the copies alternate -----------
mkdir -p "$work/export" "$work/ganesha"
cat >"$work/ganesha/ganesha.conf" <<CONF
NFS_CORE_PARAM {
    Protocols = 3;
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}
EXPORT {
    Export_Id = 1;
    Path = $work/export;
    Pseudo = /export;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3;
    Transports = TCP;
    PrivilegedPort = false;
    FSAL { Name = VFS; }
}
LOG { Default_Log_Level = WARN; }
CONF
rpcbind -f -w &
rpcbind_pid=$!
sleep 0.5
ganesha.nfsd -F -L "$work/ganesha/ganesha.log" -f "$work/ganesha/ganesha.conf" -p "$work/ganesha/ganesha.pid" &
ganesha_pid=$!
for _ in $(seq 1 100); do
    "$work/nfs_copy" 127.0.0.1:2049:20048 "$work/export" /dev/null probe 1 >/dev/null 2>&1 && break
    sleep 0.2
done

# --- firn ------------------------------------------------------------------------------------
cat >"$work/firn.toml" <<TOML
[remote]
kind = "s3"
endpoint = "$FIRN_TEST_S3_ENDPOINT"
bucket = "$FIRN_TEST_S3_BUCKET"
region = "$FIRN_TEST_S3_REGION"
access_key_id = "$FIRN_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$FIRN_TEST_S3_SECRET_ACCESS_KEY"
prefix = "bench-nfs"
[local]
data_dir = "$work/firn-data"
[http]
listen = "127.0.0.1:7420"
[nbd]
listen = ""
[nfs]
listen = "127.0.0.1:2050"
TOML
env -u AWS_CA_BUNDLE "$firn" serve --config "$work/firn.toml" >"$work/firn.out" 2>"$work/firn.err" &
firn_pid=$!
for _ in $(seq 1 100); do grep -q '^Press Ctrl-C to stop\.' "$work/firn.out" && break; sleep 0.1; done
f() { "$firn" "$@" --config "$work/firn.toml"; }
f share create bench >/dev/null
uploaded() { # seconds until share bench has nothing left to upload
    python3 - "$firn" "$work/firn.toml" <<'PY'
import json, subprocess, sys, time
firn, cfg = sys.argv[1:]
start = time.monotonic()
while True:
    s = json.loads(subprocess.run([firn, "share", "show", "bench", "--config", cfg],
                                  check=True, capture_output=True, text=True).stdout)["status"]
    if s["dirty_files"] == 0 and s["pending_deletes"] == 0 and s["uploading_files"] == 0:
        print(f"{time.monotonic() - start:.3f}")
        break
    if time.monotonic() - start > 1800:
        sys.exit(f"not uploaded after 1800 s: {s}")
    time.sleep(0.2)
PY
}

firn_at=(127.0.0.1:2050:2050 /bench)
ganesha_at=(127.0.0.1:2049:20048 "$work/export")
# Every copy runs twice per server, in the order firn, ganesha, ganesha, firn, and each
# server's faster copy counts. On this kind of virtual machine one copy's time varies up to 3x
# with what ran just before it: the balloon reports free pages to the host, so memory left
# unused for a few seconds faults on the host at its next touch, and the disk's write-back of
# the copy before may still be running. Firn's copies each end when the bucket holds
# everything (its uploads are part of its copy's work, and none is left to run during
# ganesha's); nfs_copy prints, on stderr, a large file's writes' time apart from its commit's.
declare -A best=() runs=() bucket=()
alternate() { # what local -> each server's copies, the faster in ${best[server]}
    local what=$1 local=$2 server n=0 seconds t0 wait_s at
    best=() runs=() bucket=()
    for server in firn ganesha ganesha firn; do
        n=$((n + 1))
        if [ "$server" = firn ]; then at=("${firn_at[@]}"); else at=("${ganesha_at[@]}"); fi
        [ "$server" = firn ] && [ "$what" = tree ] && [ -n "${PAUSE_UPLOADS:-}" ] &&
            f bandwidth --upload paused >/dev/null
        t0=$(now)
        read -r _ _ seconds < <(copy "${at[0]}" "${at[1]}" "$local" "$what-$n")
        if [ "$server" = firn ]; then
            [ -n "${PAUSE_UPLOADS:-}" ] && f bandwidth --upload unlimited >/dev/null
            wait_s=$(uploaded)
            # From the start of the copy until the bucket holds every file.
            bucket[$n]=$(calc "f'{$(now) - $t0:.3f}'")
            echo "firn $what copy $n: ${seconds}s; in the bucket ${bucket[$n]}s after the copy began (${wait_s}s after it ended)" >&2
        else
            echo "ganesha $what copy $n: ${seconds}s" >&2
        fi
        runs[$server]+="${runs[$server]:+ & }$seconds"
        best[$server]=$(calc "min(${best[$server]:-1e9}, $seconds)")
    done
}
alternate big "$work/big.bin"
firn_big_s=${best[firn]} ganesha_big_s=${best[ganesha]}
echo "$big: firn ${firn_big_s}s (runs: ${runs[firn]}), ganesha ${ganesha_big_s}s (runs: ${runs[ganesha]})"
alternate tree "$work/tree"
firn_tree_s=${best[firn]} ganesha_tree_s=${best[ganesha]}
firn_bucket_s=$(calc "min(${bucket[1]}, ${bucket[4]})")
echo "$files files: firn ${firn_tree_s}s (runs: ${runs[firn]}), ganesha ${ganesha_tree_s}s (runs: ${runs[ganesha]}); firn's tree in the bucket after ${bucket[1]}s and ${bucket[4]}s"
# Diagnostic: the tree again, with Garage on a core of its own and the server and client on the
# other (ganesha gets that same one core): the store's work off the client's CPU, as with a
# remote bucket, firn's own upload work still on it.
pinned=
if [ "$(nproc)" -ge 2 ]; then
    pinned=1
    all_cpus=0-$(($(nproc) - 1))
    taskset -a -p -c 1 "$GARAGE_PID" >/dev/null
    taskset -a -p -c 0 "$firn_pid" >/dev/null
    taskset -a -p -c 0 "$ganesha_pid" >/dev/null
    drop_caches
    read -r _ _ firn_pinned_s < <("${pin_client[@]}" "$work/nfs_copy" "${firn_at[@]}" "$work/tree" tree-pinned "$connections")
    uploaded >/dev/null
    drop_caches
    read -r _ _ ganesha_pinned_s < <("${pin_client[@]}" "$work/nfs_copy" "${ganesha_at[@]}" "$work/tree" tree-pinned "$connections")
    taskset -a -p -c "$all_cpus" "$GARAGE_PID" >/dev/null
    echo "Garage on its own core, server and client on the other: $files files, firn ${firn_pinned_s}s, ganesha ${ganesha_pinned_s}s"
fi
kill -TERM "$ganesha_pid" "$rpcbind_pid"; wait "$ganesha_pid" "$rpcbind_pid" 2>/dev/null || true
ganesha_pid= rpcbind_pid=
kill -TERM "$firn_pid"; wait "$firn_pid" 2>/dev/null || true; firn_pid=

# --- cold read: firn again with a 1 MiB cache, so the big file is evicted -----------------------
printf '[shares]\ncache_max = "1MiB"\n' >>"$work/firn.toml"
env -u AWS_CA_BUNDLE "$firn" serve --config "$work/firn.toml" >"$work/firn.out" 2>>"$work/firn.err" &
firn_pid=$!
for _ in $(seq 1 100); do grep -q '^Press Ctrl-C to stop\.' "$work/firn.out" && break; sleep 0.1; done
# Evicted, and eviction over (the tree's files go too): the read then has firn to itself.
last=-1
for _ in $(seq 1 300); do
    # du fails when a file goes while it counts: that reading is just not the last.
    used=$(du -sb "$work/firn-data/shares" 2>/dev/null | cut -f1 || true)
    [ "$used" -lt $((64 << 20)) ] && [ "$used" = "$last" ] && break
    last=$used
    sleep 1
done
drop_caches
t0=$(now)
nfs-cat "nfs://127.0.0.1/bench/big-1/big.bin?nfsport=2050&mountport=2050" | cmp - "$work/big.bin"
firn_cold_s=$(calc "f'{$(now) - $t0:.3f}'")
kill -TERM "$firn_pid"; wait "$firn_pid" 2>/dev/null || true; firn_pid=

# --- rclone, the same tree to the same Garage, twice like firn's --------------------------------
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other
export RCLONE_CONFIG_BENCH_ENDPOINT=$FIRN_TEST_S3_ENDPOINT RCLONE_CONFIG_BENCH_REGION=$FIRN_TEST_S3_REGION
export RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=$FIRN_TEST_S3_ACCESS_KEY_ID
export RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=$FIRN_TEST_S3_SECRET_ACCESS_KEY
export RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true
rclone_runs=
for n in 1 2; do
    drop_caches
    t0=$(now)
    env -u AWS_CA_BUNDLE rclone -q copy "$work/tree" "bench:$FIRN_TEST_S3_BUCKET/bench-rclone/tree-$n"
    rclone_runs+="${rclone_runs:+ & }$(calc "f'{$(now) - $t0:.3f}'")"
done
rclone_s=$(calc "min(${rclone_runs//&/,})")
echo "rclone copy of the tree: ${rclone_s}s (runs: $rclone_runs)"
drop_caches
t0=$(now)
env -u AWS_CA_BUNDLE rclone cat "bench:$FIRN_TEST_S3_BUCKET/bench-nfs/bench/big-1/big.bin" | cmp - "$work/big.bin"
rclone_cat_s=$(calc "f'{$(now) - $t0:.3f}'")
echo "cold read of $big: firn (nfs-cat) ${firn_cold_s}s, rclone cat ${rclone_cat_s}s"

mibs() { calc "f'{$big_bytes / 2**20 / $1:.1f}'"; }
fps() { calc "f'{$files / $1:.0f}'"; }
echo
printf 'ratio: %-24s %6s    goal >= 0.8   (firn %s / ganesha %s MiB/s)\n' nfs-write-big \
    "$(calc "f'{$ganesha_big_s / $firn_big_s:.2f}'")" "$(mibs "$firn_big_s")" "$(mibs "$ganesha_big_s")"
printf 'ratio: %-24s %6s    goal >= 0.8   (firn %s / ganesha %s files/s)\n' nfs-tree-files \
    "$(calc "f'{$ganesha_tree_s / $firn_tree_s:.2f}'")" "$(fps "$firn_tree_s")" "$(fps "$ganesha_tree_s")"
[ -n "$pinned" ] && printf 'ratio: %-24s %6s    goal (diagnostic)   (firn %s / ganesha %s files/s, Garage on its own core)\n' \
    nfs-tree-files-store-own-core "$(calc "f'{$ganesha_pinned_s / $firn_pinned_s:.2f}'")" \
    "$(fps "$firn_pinned_s")" "$(fps "$ganesha_pinned_s")"
printf 'ratio: %-24s %6s    goal <= 1.2   (firn %ss / rclone %ss, lower is better)\n' nfs-tree-bucket \
    "$(calc "f'{$firn_bucket_s / $rclone_s:.2f}'")" "$firn_bucket_s" "$rclone_s"
printf 'ratio: %-24s %6s    goal (diagnostic)   (firn %s / rclone cat %s MiB/s)\n' nfs-cold-read \
    "$(calc "f'{$rclone_cat_s / $firn_cold_s:.2f}'")" "$(mibs "$firn_cold_s")" "$(mibs "$rclone_cat_s")"
