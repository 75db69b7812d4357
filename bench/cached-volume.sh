#!/usr/bin/env bash
# firn's cached volumes (log on local disk, segments in the bucket) against reference tools,
# one run, with a throwaway Garage on loopback that the script starts and stops.
#
#   bench/cached-volume.sh
#   SIZE=1G RUNTIME=10 FIO_SIZE=1G WRITE_IO=1G COLD_SIZE=256M COLD_RAND_IO=16M SCATTER_IO=256M \
#       bench/cached-volume.sh                    (the defaults: about 30 minutes on 2 cores, 18 of them part 1)
#   PARTS="cold lag" bench/cached-volume.sh       (only some parts: fio drain trim cold lag)
#
# Needs root (drop_caches), fio, nbdkit, nbdinfo, qemu-img, python3-libnbd, rclone, garage, curl.
#
# Every server listens on 127.0.0.1 only. Prints raw figures, then `ratio:` lines with the goal
# beside each:
#   1. fio over NBD, firn cached volume vs `nbdkit file` (same file system, same jobs, RUNTIME s
#      each): 4 KiB random write/read at iodepth 32 (IOPS), 1 MiB sequential write/read at
#      iodepth 8 (MiB/s), 4 KiB random writes with a FLUSH every 8 writes at iodepth 1
#      (`--fsync=8`, IOPS), and that job again while Garage is frozen (SIGSTOP); then the
#      three write jobs again with firn's uploads paused during its job (`-uploads-paused`,
#      diagnostic: firn's own write path without upload work on the shared cores), and once
#      more with Garage on one core and firn, nbdkit and fio on the other (`-store-own-core`,
#      diagnostic: as with a remote bucket, the store's hashing and writing off the client's
#      CPU, firn's own upload work still on it); and the 1 MiB jobs against nbdkit with its
#      luks filter (`-vs-luks`, diagnostic: the same work as firn's, every byte encrypted at
#      rest, which `nbdkit file` does not do). The 4 KiB
#      random and 1 MiB sequential write jobs each write WRITE_IO rather than run for RUNTIME:
#      a burst that the log (log_max, 2 GiB by default) absorbs at local-disk speed while it
#      uploads. Writes past log_max of backlog go at the bucket's speed, whatever the disk's:
#      part 2 measures that speed against rclone. Each job, firn's and nbdkit's, starts with
#      the bucket holding everything and the page cache dropped, and runs twice (firn,
#      nbdkit, nbdkit, firn), the better run counted: on this kind of virtual machine the
#      order alone moved the 1 MiB write ratio from 0.17 to 1.24 (see fio_pair).
#      `ratio: cached-<job> <firn/nbdkit>`, higher is better; goal >= 0.8.
#   2. Drain: SIZE of 4 KiB random writes and a flush land in the log while uploads are paused
#      (`firn bandwidth --upload paused`); then uploads resume and the clock runs until the
#      bucket holds the commit (pending_flushes 0, dirty_bytes <= 64). Against `rclone copy`
#      of a SIZE file to the same Garage. `ratio: cached-drain <rclone_s/firn_s>`: HIGHER is
#      better (a throughput ratio); goal >= 0.8.
#   3. Upload amplification: cache.bytes_uploaded per byte the client wrote, for SIZE of 1 MiB
#      sequential and of 4 KiB random writes (each a fresh volume, until committed); and PUTs
#      per GiB written (firn_remote_requests_total{op="put"}). LOWER is better; goal <= 1.1.
#   4. Cold reads, on a second firn with cache_max = "0" and checkpoint_segments = 1: 1 MiB
#      sequential reads of COLD_SIZE that only the bucket holds, against `rclone cat` of as
#      many bytes (`ratio: cached-cold-seqread <firn/rclone MiB/s>`, goal >= 0.8), and 4 KiB
#      random reads (COLD_RAND_IO of them): bytes fetched per byte served (goal <= 2).
#   5. TRIM of a whole 2 TiB volume through libnbd (an NBD request's length is 32-bit, so it
#      is 513 TRIMs of 4 GiB - 4 KiB, 16 in flight, then a FLUSH): seconds, and bytes uploaded
#      until committed (goal < 1 s, < 64 KiB).
#   6. A fresh firn (cache_max 4GiB): a 1 TiB volume gets SCATTER_IO of 4 KiB random writes
#      spread over the whole TiB, then RUNTIME s of flush-every-8 random writes while
#      cache.last_commit_age_secs is sampled every 0.5 s: p99 commit lag (goal < 5 s) and
#      firn's peak RSS, VmHWM (goal < 300 MiB). The map holds a piece per live scattered
#      write (about 60 bytes each), so what bounds the RSS is how many there are: the
#      default, 4 GiB, leaves a million.
# Reading the figures: Garage shares the machine's cores with firn, fio and nbdkit, so firn's
# uploads (and Garage storing them) compete with the client for CPU; nbdkit uploads nothing.
# Garage answers a ranged GET on a reused connection with its body ~40 ms after its headers
# (measured with strace; most likely Nagle on its side against delayed ACK on ours), which
# bounds the cold-read figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

size=${SIZE:-1G}             # drain and amplification jobs (the issue's 1 GiB)
runtime=${RUNTIME:-10}       # each timed fio job, and the commit-lag load
fio_size=${FIO_SIZE:-1G}     # the volume/file the fio comparison runs on
write_io=${WRITE_IO:-1G}     # what each 4 KiB random and 1 MiB sequential write job writes
cold_size=${COLD_SIZE:-256M} # cold sequential read
cold_rand_io=${COLD_RAND_IO:-16M}
scatter_io=${SCATTER_IO:-4G}    # a million map pieces
parts=" ${PARTS:-fio drain trim cold lag} " # which of the parts below to run
want() { [[ $parts == *" $1 "* ]]; }

cargo build --release --quiet
work=$(mktemp -d -t firn-bench-cached.XXXXXX)
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/firn" "$work/firn" # a shared target dir cannot swap it mid-run
firn=$work/firn
firn_pid=
nbdkit_pid= luks_pid=
garage_stopped=
cleanup() {
    local status=$?
    [ -n "$garage_stopped" ] && kill -CONT "$GARAGE_PID" 2>/dev/null
    for pid in $nbdkit_pid $luks_pid $firn_pid; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $nbdkit_pid $luks_pid $firn_pid; do wait "$pid" 2>/dev/null || true; done
    if [ "$status" -ne 0 ]; then
        for log in "$work"/firn-*.err "$work"/nbdkit.err; do
            [ -s "$log" ] && { echo "--- $log (last 40 lines)"; tail -n 40 "$log"; } >&2
        done
    fi
    bash scripts/garage.sh stop "$work/garage" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

bash scripts/garage.sh start "$work/garage" >/dev/null
# shellcheck source=/dev/null
source "$work/garage/env"
FIRN_MASTER_KEY=$(openssl rand -hex 32)
export FIRN_MASTER_KEY

echo "firn $("$firn" --version | awk '{print $2}'), $(nbdkit --version), $(fio --version), $(rclone version | head -n 1)"
echo "SIZE=$size RUNTIME=$runtime FIO_SIZE=$fio_size WRITE_IO=$write_io COLD_SIZE=$cold_size COLD_RAND_IO=$cold_rand_io SCATTER_IO=$scatter_io"
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); work dir $work ($(df --output=source,fstype "$work" | tail -n 1 | tr -s ' '))"

free_ports() { # n
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
}

# Starts a firn named $1 (own data dir and bucket prefix) with extra [volumes] lines in $2;
# sets firn_pid, cfg, http_port, nbd_port. One firn runs at a time.
start_firn() { # name volumes-toml
    local name=$1
    read -r http_port nbd_port < <(free_ports 2)
    cfg=$work/firn-$name.toml
    cat >"$cfg" <<TOML
[remote]
kind = "s3"
endpoint = "$FIRN_TEST_S3_ENDPOINT"
bucket = "$FIRN_TEST_S3_BUCKET"
region = "$FIRN_TEST_S3_REGION"
access_key_id = "$FIRN_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$FIRN_TEST_S3_SECRET_ACCESS_KEY"
prefix = "bench-$name"
[local]
data_dir = "$work/firn-$name"
[keys]
source = "env"
[nfs]
listen = ""
[http]
listen = "127.0.0.1:$http_port"
[nbd]
listen = "127.0.0.1:$nbd_port"
[volumes]
$2
TOML
    env -u AWS_CA_BUNDLE "$firn" serve --config "$cfg" >"$work/firn-$name.out" 2>"$work/firn-$name.err" &
    firn_pid=$!
    for _ in $(seq 1 100); do
        grep -q '^Press Ctrl-C to stop\.' "$work/firn-$name.out" && return 0
        kill -0 "$firn_pid" 2>/dev/null || { echo "firn serve exited during startup" >&2; exit 1; }
        sleep 0.1
    done
    echo "firn serve not ready after 10 s" >&2
    exit 1
}
stop_firn() {
    kill -TERM "$firn_pid"
    wait "$firn_pid" 2>/dev/null || true
    firn_pid=
}

f() { "$firn" "$@" --config "$cfg"; }
# One field of `firn volume show NAME`'s cache object.
cache() { # volume field
    f volume show "$1" | python3 -c "import json, sys; v = json.load(sys.stdin)['cache']['$2']; print('none' if v is None else v)"
}
puts() { # firn's PUT requests so far
    curl -fsS "http://127.0.0.1:$http_port/metrics" |
        awk '/^firn_remote_requests_total\{.*op="put"/ {n += $NF} END {print n + 0}'
}
# Seconds until the bucket holds a commit of every flush (up to 600 s).
wait_committed() { # volume
    python3 - "$firn" "$cfg" "$1" <<'PY'
import json, subprocess, sys, time
firn, cfg, name = sys.argv[1:]
start = time.monotonic()
while True:
    c = json.loads(subprocess.run([firn, "volume", "show", name, "--config", cfg],
                                  check=True, capture_output=True, text=True).stdout)["cache"]
    if c["pending_flushes"] == 0 and c["dirty_bytes"] <= 64:
        print(f"{time.monotonic() - start:.3f}")
        break
    if time.monotonic() - start > 600:
        sys.exit(f"{name} not committed after 600 s: {c}")
    time.sleep(0.05)
PY
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
calc() { python3 -c "print($*)"; }
now() { date +%s.%N; }

# cwd = work dir, so fio leaves no state files in the repository.
pin=() # a command prefix for fio (taskset), for the store-own-core jobs
fio_run() { # json-out uri rw bs iodepth [more fio args]
    local out=$1 target=$2 rw=$3 bs=$4 depth=$5
    shift 5
    drop_caches
    (cd "$work" && "${pin[@]}" fio --name=bench --ioengine=nbd --uri="$target" --rw="$rw" --bs="$bs" \
        --iodepth="$depth" --numjobs=1 --output-format=json --output="$out" "$@")
}
fio_result() { # json-file iops|mibs|bytes
    python3 - "$1" "$2" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
r, w = job["read"], job["write"]
if sys.argv[2] == "iops":
    print(f"{r['iops'] + w['iops']:.0f}")
elif sys.argv[2] == "mibs":
    print(f"{(r['bw_bytes'] + w['bw_bytes']) / 2**20:.1f}")
else:
    print(r["io_bytes"] + w["io_bytes"])
PY
}

ratios=()
add_ratio() { # name value goal [note]
    ratios+=("$(printf 'ratio: %-36s %8s    goal %s%s' "$1" "$2" "$3" "${4:+   ($4)}")")
}

# rclone against the same bucket, through environment config.
export RCLONE_CONFIG_BENCH_TYPE=s3
export RCLONE_CONFIG_BENCH_PROVIDER=Other
export RCLONE_CONFIG_BENCH_ENDPOINT=$FIRN_TEST_S3_ENDPOINT
export RCLONE_CONFIG_BENCH_REGION=$FIRN_TEST_S3_REGION
export RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=$FIRN_TEST_S3_ACCESS_KEY_ID
export RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=$FIRN_TEST_S3_SECRET_ACCESS_KEY
export RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true
rclone() { env -u AWS_CA_BUNDLE rclone -q "$@"; }
bucket=bench:$FIRN_TEST_S3_BUCKET

if want fio || want drain || want trim; then start_firn main ""; fi
if want fio; then
# ---------------------------------------------------------------------------------------------
echo
echo "== 1. fio over NBD: firn cached volume vs nbdkit file ($fio_size, $runtime s per job)"
f volume create fio --size "$fio_size" >/dev/null
truncate -s "$fio_size" "$work/nbdkit.img"
# The same-work reference: nbdkit's luks filter over a LUKS image (AES-256-XTS), so that every
# byte is encrypted at rest there too.
qemu-img create -q -f luks --object secret,id=sec0,data=bench-passphrase -o key-secret=sec0 \
    "$work/luks.img" "$fio_size"
read -r nbdkit_port luks_port < <(free_ports 2)
nbdkit -f -i 127.0.0.1 -p "$nbdkit_port" file "$work/nbdkit.img" 2>"$work/nbdkit.err" &
nbdkit_pid=$!
nbdkit -f -i 127.0.0.1 -p "$luks_port" --filter=luks file "$work/luks.img" \
    passphrase=bench-passphrase 2>"$work/nbdkit-luks.err" &
luks_pid=$!
for port in "$nbdkit_port" "$luks_port"; do
    for _ in $(seq 1 100); do nbdinfo "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
declare -A uri=([firn]="nbd://127.0.0.1:$nbd_port/fio" [nbdkit]="nbd://127.0.0.1:$nbdkit_port/"
    [luks]="nbd://127.0.0.1:$luks_port/")

# Reads must hit written data, not holes.
for server in firn nbdkit luks; do
    fio_run "$work/prefill-$server.json" "${uri[$server]}" write 1M 8 --size="$fio_size" --end_fsync=1
done
wait_committed fio >/dev/null
echo "prefilled all three ($fio_size, sequential 1 MiB writes), firn's volume committed"

jobs=( # name rw bs iodepth unit [fio args]
    "randwrite-4k randwrite 4k 32 iops --io_size=$write_io"
    "randread-4k randread 4k 32 iops"
    "seqwrite-1m write 1M 8 mibs --io_size=$write_io"
    "seqread-1m read 1M 8 mibs"
    "randwrite-4k-fsync8 randwrite 4k 1 iops --fsync=8"
)
fio_pair() { # name rw bs depth unit [fio args]; against $ref (nbdkit unless set)
    local name=$1 rw=$2 bs=$3 depth=$4 unit=$5 ref=${ref:-nbdkit} server label timing run
    shift 5
    # A write job with a set amount of I/O runs until it is done; the others for RUNTIME s.
    if [[ " $* " == *" --io_size="* ]]; then timing=(); else timing=(--time_based --runtime="$runtime"); fi
    declare -A value=() runs=()
    # Each server runs the job twice, in the order firn, nbdkit, nbdkit, firn, and its better
    # run counts. A job's figure depends on what ran just before it: memory the machine left
    # idle for a few seconds is handed back to the host by the balloon's free page reporting,
    # and faults there at its next touch, so a job that fills the page cache after an idle
    # wait ran up to 6x slower than right after another job (1 MiB writes: firn first, 0.17
    # of nbdkit; nbdkit first, 1.24). Both orders, each server's best: neither is favoured.
    for server in firn "$ref" "$ref" firn; do
        # Each job starts with the bucket holding everything: no upload left over from the
        # job before competes for the CPU, nbdkit's included (firn's job's own uploads do
        # compete with it: that is the product).
        [ -n "$garage_stopped" ] || wait_committed fio >/dev/null
        # And with the page cache dropped: what one job's writes and reads leave there (large
        # folios, dirty pages still being written back) changes the next job's cost.
        drop_caches
        [ "$server" = firn ] && [ -n "$uploads_paused" ] && f bandwidth --upload paused >/dev/null
        fio_run "$work/$name-$server.json" "${uri[$server]}" "$rw" "$bs" "$depth" \
            --size="$fio_size" "${timing[@]}" "$@"
        [ "$server" = firn ] && [ -n "$uploads_paused" ] && f bandwidth --upload unlimited >/dev/null
        run=$(fio_result "$work/$name-$server.json" "$unit")
        runs[$server]+="${runs[$server]:+ & }$run"
        value[$server]=$(calc "max(${value[$server]:-0}, $run)")
    done
    label=$([ "$unit" = iops ] && echo IOPS || echo MiB/s)
    printf '%-32s firn %9s %-5s   %s %9s %s   (runs: firn %s, %s %s)\n' "cached-$name" \
        "${value[firn]}" "$label" "$ref" "${value[$ref]}" "$label" "${runs[firn]}" "$ref" "${runs[$ref]}"
    add_ratio "cached-$name" "$(calc "f'{${value[firn]} / ${value[$ref]}:.2f}'")" "${goal:->= 0.8}" \
        "firn ${value[firn]} / $ref ${value[$ref]} $label"
}
uploads_paused= goal=
for job in "${jobs[@]}"; do
    # shellcheck disable=SC2086 # the fio arguments split on purpose
    fio_pair $job
done

# The 1 MiB jobs again against nbdkit with its luks filter: the same work as firn's (every byte
# encrypted at rest), where `nbdkit file` copies bytes only. At 1 MiB the cipher is most of
# the cost, so this tells how much of the gap to `nbdkit file` encryption at rest accounts for.
# Not a goal (the goal is against `nbdkit file`).
ref=luks goal="(diagnostic)"
for job in "${jobs[2]}" "${jobs[3]}"; do
    read -r name rest <<<"$job"
    # shellcheck disable=SC2086 # the fio arguments split on purpose
    fio_pair "$name-vs-luks" $rest
done
ref= goal=

# The write jobs again with firn's uploads paused for the length of its job: what firn's own
# write path reaches when neither its uploads nor Garage storing them take the cores. Not a
# goal (the goal is with uploads running); it tells the two costs apart.
uploads_paused=1 goal="(diagnostic)"
for job in "${jobs[0]}" "${jobs[2]}" "${jobs[4]}"; do
    read -r name rest <<<"$job"
    # shellcheck disable=SC2086 # the fio arguments split on purpose
    fio_pair "$name-uploads-paused" $rest
done
uploads_paused= goal=

# The write jobs again with Garage on a core of its own and firn, nbdkit and fio sharing the
# other (taskset): as when the bucket is elsewhere, the store's work (hashing and writing what
# it receives) takes none of the client's CPU, while firn's own upload work (reading segments,
# sending them, checksums) still does. Not a goal either (the goal is on the shared cores);
# it tells what the gap on shared cores owes to Garage being on the same machine.
if [ "$(nproc)" -ge 2 ]; then
    all_cpus=0-$(($(nproc) - 1))
    taskset -a -p -c 1 "$GARAGE_PID" >/dev/null
    for pid in "$firn_pid" "$nbdkit_pid"; do taskset -a -p -c 0 "$pid" >/dev/null; done
    pin=(taskset -c 0) goal="(diagnostic)"
    for job in "${jobs[0]}" "${jobs[2]}" "${jobs[4]}"; do
        read -r name rest <<<"$job"
        # shellcheck disable=SC2086 # the fio arguments split on purpose
        fio_pair "$name-store-own-core" $rest
    done
    for pid in "$GARAGE_PID" "$firn_pid" "$nbdkit_pid"; do taskset -a -p -c "$all_cpus" "$pid" >/dev/null; done
    pin=() goal=
fi

# The bucket stops answering (the process is frozen: connections hang rather than fail).
wait_committed fio >/dev/null
kill -STOP "$GARAGE_PID"
garage_stopped=1
fio_pair randwrite-4k-fsync8-outage randwrite 4k 1 iops --fsync=8
echo "firn with the bucket frozen / with it up: $(calc "f'{$(fio_result "$work/randwrite-4k-fsync8-outage-firn.json" iops) / $(fio_result "$work/randwrite-4k-fsync8-firn.json" iops):.2f}'")"
echo "during the outage firn said: last_error=$(cache fio last_error), pending_flushes=$(cache fio pending_flushes), dirty_bytes=$(cache fio dirty_bytes)"
kill -CONT "$GARAGE_PID"
garage_stopped=
s=$(wait_committed fio)
echo "after Garage resumed: committed in $s s"
kill -TERM "$nbdkit_pid" "$luks_pid"
wait "$nbdkit_pid" "$luks_pid" 2>/dev/null || true
nbdkit_pid= luks_pid=
rm -f "$work/nbdkit.img" "$work/luks.img"
f volume delete fio >/dev/null || true

fi
if want drain; then
# ---------------------------------------------------------------------------------------------
echo
echo "== 2./3. drain and upload amplification ($size)"
size_bytes=$(numfmt --from=iec "$size")
amp_job() { # volume rw bs depth -> prints "written uploaded puts drain_s write_s"
    local vol=$1 rw=$2 bs=$3 depth=$4 up0 put0 t0 t1 written drain
    f volume create "$vol" --size "$size" >/dev/null
    up0=$(cache "$vol" bytes_uploaded)
    put0=$(puts)
    f bandwidth --upload paused >/dev/null
    t0=$(now)
    fio_run "$work/$vol.json" "nbd://127.0.0.1:$nbd_port/$vol" "$rw" "$bs" "$depth" \
        --size="$size" --end_fsync=1
    t1=$(now)
    written=$(fio_result "$work/$vol.json" bytes)
    drop_caches # rclone reads its file from disk too
    f bandwidth --upload unlimited >/dev/null
    drain=$(wait_committed "$vol")
    echo "$written $(($(cache "$vol" bytes_uploaded) - up0)) $(($(puts) - put0)) $drain $(calc "f'{$t1 - $t0:.3f}'")"
}
read -r rw_written rw_up rw_puts rw_drain rw_write_s < <(amp_job drain randwrite 4k 32)
read -r sq_written sq_up sq_puts sq_drain sq_write_s < <(amp_job seq write 1M 8)
head -c "$size_bytes" /dev/urandom >"$work/drain.bin"
drop_caches
t0=$(now)
rclone copy --s3-upload-concurrency 8 --s3-chunk-size 16M "$work/drain.bin" "$bucket/rclone-drain"
t1=$(now)
rclone_s=$(calc "f'{$t1 - $t0:.3f}'")
rm -f "$work/drain.bin"
echo "4 KiB random: $rw_written bytes written in $rw_write_s s (uploads paused), then drained in $rw_drain s; rclone copy of $size: $rclone_s s"
echo "1 MiB sequential: $sq_written bytes written in $sq_write_s s (uploads paused), then drained in $sq_drain s"
echo "uploaded: random $rw_up bytes in $rw_puts PUTs, sequential $sq_up bytes in $sq_puts PUTs"
add_ratio cached-drain "$(calc "f'{$rclone_s / $rw_drain:.2f}'")" ">= 0.8" "rclone ${rclone_s}s / firn ${rw_drain}s, higher is better"
add_ratio cached-upload-amplification-seq "$(calc "f'{$sq_up / $sq_written:.3f}'")" "<= 1.1" "uploaded/written, lower is better"
add_ratio cached-upload-amplification-rand4k "$(calc "f'{$rw_up / $rw_written:.3f}'")" "<= 1.1" "uploaded/written, lower is better"
add_ratio cached-puts-per-gib-seq "$(calc "f'{$sq_puts / ($sq_written / 2**30):.1f}'")" "-" "PUT requests per GiB written"
add_ratio cached-puts-per-gib-rand4k "$(calc "f'{$rw_puts / ($rw_written / 2**30):.1f}'")" "-" "PUT requests per GiB written"
f volume delete drain >/dev/null || true
f volume delete seq >/dev/null || true

fi
if want trim; then
# ---------------------------------------------------------------------------------------------
echo
echo "== 5. TRIM of a 2 TiB volume"
f volume create trim --size 2T >/dev/null
wait_committed trim >/dev/null
up0=$(cache trim bytes_uploaded)
put0=$(puts)
t0=$(now)
/usr/bin/python3 - "nbd://127.0.0.1:$nbd_port/trim" <<'PY'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size, step, off = h.get_size(), 0xFFFFF000, 0  # an NBD request's length is 32-bit
while off < size:
    n = min(step, size - off)
    h.aio_trim(n, off)
    off += n
    while h.aio_in_flight() >= 16:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
PY
t1=$(now)
commit_s=$(wait_committed trim)
trim_s=$(calc "f'{$t1 - $t0:.3f}'")
trim_up=$(($(cache trim bytes_uploaded) - up0))
echo "TRIM 0..2T + flush: $trim_s s; then committed in $commit_s s; uploaded $trim_up bytes in $(($(puts) - put0)) PUTs"
add_ratio cached-trim-2t-seconds "$trim_s" "< 1" "TRIMs + FLUSH"
add_ratio cached-trim-2t-bytes-uploaded "$trim_up" "< 65536"
f volume delete trim >/dev/null || true
fi
if want fio || want drain || want trim; then stop_firn; fi

if want cold; then
# ---------------------------------------------------------------------------------------------
echo
echo "== 4. cold reads (cache_max = \"0\", checkpoint_segments = 1; $cold_size sequential, $cold_rand_io random 4 KiB)"
start_firn cold $'cache_max = "0"\ncheckpoint_segments = 1'
for vol in cold-seq cold-rand; do
    f volume create "$vol" --size "$cold_size" >/dev/null
    fio_run "$work/fill-$vol.json" "nbd://127.0.0.1:$nbd_port/$vol" write 1M 8 --size="$cold_size" --end_fsync=1
    wait_committed "$vol" >/dev/null
done
sleep 2 # let eviction catch up with the last checkpoint
echo "local cache after commit: cold-seq $(cache cold-seq cached_bytes) bytes, cold-rand $(cache cold-rand cached_bytes) bytes"
down0=$(cache cold-seq bytes_downloaded)
fio_run "$work/cold-seq.json" "nbd://127.0.0.1:$nbd_port/cold-seq" read 1M 8 --size="$cold_size"
firn_mibs=$(fio_result "$work/cold-seq.json" mibs)
seq_down=$(($(cache cold-seq bytes_downloaded) - down0))
cold_bytes=$(numfmt --from=iec "$cold_size")
head -c "$cold_bytes" /dev/urandom >"$work/cold.bin"
rclone copy "$work/cold.bin" "$bucket/rclone-cold"
rm -f "$work/cold.bin"
drop_caches
t0=$(now)
rclone cat --count "$cold_bytes" "$bucket/rclone-cold/cold.bin" >/dev/null
t1=$(now)
rclone_mibs=$(calc "f'{$cold_bytes / 2**20 / ($t1 - $t0):.1f}'")
echo "sequential 1 MiB reads: firn $firn_mibs MiB/s (fetched $seq_down bytes), rclone cat $rclone_mibs MiB/s"
add_ratio cached-cold-seqread "$(calc "f'{$firn_mibs / $rclone_mibs:.2f}'")" ">= 0.8" "firn $firn_mibs / rclone $rclone_mibs MiB/s"
down0=$(cache cold-rand bytes_downloaded)
fio_run "$work/cold-rand.json" "nbd://127.0.0.1:$nbd_port/cold-rand" randread 4k 32 \
    --size="$cold_size" --io_size="$cold_rand_io"
served=$(fio_result "$work/cold-rand.json" bytes)
rand_down=$(($(cache cold-rand bytes_downloaded) - down0))
echo "random 4 KiB reads: $(fio_result "$work/cold-rand.json" iops) IOPS, served $served bytes, fetched $rand_down bytes"
curl -fsS "http://127.0.0.1:$http_port/metrics" | awk '
    /^firn_remote_request_seconds_sum\{op="get_range"\}/ {s = $NF}
    /^firn_remote_request_seconds_count\{op="get_range"\}/ {n = $NF}
    END {if (n) printf "firn ranged GETs (both cold jobs): %d, mean %.1f ms each\n", n, 1000 * s / n}'

add_ratio cached-cold-randread-fetched-per-served "$(calc "f'{$rand_down / $served:.2f}'")" "<= 2" "lower is better"
stop_firn

fi
if want lag; then
# ---------------------------------------------------------------------------------------------
echo
echo "== 6. commit lag and peak RSS: fresh firn, 1 TiB volume, cache_max 4GiB"
start_firn lag 'cache_max = "4GiB"'
f volume create lag --size 1T >/dev/null
lag_uri="nbd://127.0.0.1:$nbd_port/lag"
fio_run "$work/scatter.json" "$lag_uri" randwrite 4k 32 --size=1T --io_size="$scatter_io" --end_fsync=1
echo "scattered $scatter_io of 4 KiB random writes over 1 TiB: $(fio_result "$work/scatter.json" iops) IOPS; map pieces $(cache lag map_pieces); VmHWM $(awk '/VmHWM/ {print $2, $3}' "/proc/$firn_pid/status")"
python3 - "$firn" "$cfg" lag "$work/lag.samples" <<'PY' &
import json, subprocess, sys, time
firn, cfg, name, out = sys.argv[1:]
with open(out, "w") as f:
    while True:
        try:
            c = json.loads(subprocess.run([firn, "volume", "show", name, "--config", cfg],
                                          check=True, capture_output=True, text=True).stdout)["cache"]
        except Exception:
            break
        print(c["last_commit_age_secs"] if c["last_commit_age_secs"] is not None else "nan", file=f, flush=True)
        time.sleep(0.5)
PY
sampler=$!
(cd "$work" && fio --name=lag --ioengine=nbd --uri="$lag_uri" --rw=randwrite --bs=4k --iodepth=1 \
    --fsync=8 --size=1T --time_based --runtime="$runtime" --output-format=json --output="$work/lag.json")
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
read -r lag_p50 lag_p99 lag_max lag_n < <(python3 - "$work/lag.samples" <<'PY'
import math, sys
xs = sorted(float(l) for l in open(sys.argv[1]) if l.strip() and l.strip() != "nan")
if not xs:
    print("nan nan nan 0")
else:
    q = lambda p: xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)]
    print(f"{q(0.5):.2f} {q(0.99):.2f} {xs[-1]:.2f} {len(xs)}")
PY
)
hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$firn_pid/status")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$firn_pid/status")
echo "flush-every-8 load: $(fio_result "$work/lag.json" iops) IOPS for $runtime s; last_commit_age_secs over $lag_n samples: p50 $lag_p50 s, p99 $lag_p99 s, max $lag_max s"
echo "firn VmHWM $((hwm_kib / 1024)) MiB, VmRSS now $((rss_kib / 1024)) MiB, $(awk '/Threads/ {print $2}' "/proc/$firn_pid/status") threads, map pieces $(cache lag map_pieces)"
add_ratio cached-commit-lag-p99-seconds "$lag_p99" "< 5"
pieces=$(cache lag map_pieces)
add_ratio cached-peak-rss-mib "$((hwm_kib / 1024))" "< 300" "VmHWM, 1 TiB volume after $scatter_io scattered 4 KiB writes, $pieces map pieces"
stop_firn
fi

echo
printf '%s\n' "${ratios[@]}"
