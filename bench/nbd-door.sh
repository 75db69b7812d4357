#!/usr/bin/env bash
# firn's NBD door against `nbdkit file`, same disk, same fio jobs, one run.
#
#   SIZE=1G RUNTIME=10 bench/nbd-door.sh        (the defaults)
#
# fio drives both servers through its nbd ioengine (libnbd), over TCP and over a Unix socket:
# 4 KiB random write/read at iodepth 32 (IOPS) and 1 MiB sequential write/read at iodepth 8
# (MiB/s), each for RUNTIME seconds. firn serves a local volume of SIZE; nbdkit serves a sparse
# file of SIZE in the same directory. Prints `ratio: nbd-<job>-<tcp|unix> <firn/nbdkit>`
# (higher is better for firn) and `ratio: nbd-cpu-per-gib <firn/nbdkit>` (server CPU seconds
# per GiB moved; LOWER is better for firn).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

size=${SIZE:-1G}
runtime=${RUNTIME:-10}

cargo build --release --quiet
firn=$PWD/target/release/firn
work=$(mktemp -d -t firn-bench-nbd.XXXXXX)
firn_pid=
nbdkit_pids=()
cleanup() {
    local status=$?
    for pid in "${nbdkit_pids[@]}" $firn_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${nbdkit_pids[@]}" $firn_pid; do
        wait "$pid" 2>/dev/null || true
    done
    # A failed fio job most likely means a server went wrong: show what it said.
    if [ "$status" -ne 0 ]; then
        for log in "$work"/firn.err "$work"/nbdkit-*.err; do
            [ -s "$log" ] && { echo "--- $log (last 40 lines)"; tail -n 40 "$log"; } >&2
        done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Three distinct free ports: hold all sockets open while choosing so none repeats.
read -r http_port firn_nbd_port nbdkit_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

echo "firn $("$firn" --version | awk '{print $2}'), $(nbdkit --version), $(fio --version)"
echo "volume/file size $size, $runtime s per job, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "work dir $work ($(df --output=source,fstype "$work" | tail -n 1 | tr -s ' '))"

cat >"$work/firn.toml" <<TOML
[local]
data_dir = "$work/firn-data"
[nfs]
listen = ""
[http]
listen = "127.0.0.1:$http_port"
[nbd]
listen = "127.0.0.1:$firn_nbd_port"
TOML
"$firn" serve --config "$work/firn.toml" >"$work/firn.out" 2>"$work/firn.err" &
firn_pid=$!
for _ in $(seq 1 100); do
    grep -q '^Press Ctrl-C to stop\.' "$work/firn.out" && break
    kill -0 "$firn_pid" 2>/dev/null || { echo "firn serve exited during startup" >&2; exit 1; }
    sleep 0.1
done
grep -q '^Press Ctrl-C to stop\.' "$work/firn.out" || { echo "firn serve not ready after 10 s" >&2; exit 1; }
"$firn" volume create bench --size "$size" --config "$work/firn.toml" >/dev/null

# nbdkit cannot listen on TCP and a Unix socket at once: one instance per transport, both on
# the same file. Jobs run one at a time, so only one of them is ever busy.
truncate -s "$size" "$work/nbdkit.img"
start_nbdkit() { # name listen-args...
    local name=$1
    shift
    nbdkit -f --pidfile "$work/nbdkit-$name.pid" "$@" file "$work/nbdkit.img" \
        2>"$work/nbdkit-$name.err" &
    nbdkit_pids+=($!)
    for _ in $(seq 1 100); do
        [ -s "$work/nbdkit-$name.pid" ] && return 0
        sleep 0.1
    done
    echo "nbdkit ($name) not ready after 10 s" >&2
    exit 1
}
start_nbdkit tcp -i 127.0.0.1 -p "$nbdkit_port"
start_nbdkit unix -U "$work/nbdkit.sock"

declare -A uri=(
    [firn-tcp]="nbd://127.0.0.1:$firn_nbd_port/bench"
    [firn-unix]="nbd+unix:///bench?socket=$work/firn-data/nbd.sock"
    [nbdkit-tcp]="nbd://127.0.0.1:$nbdkit_port/"
    [nbdkit-unix]="nbd+unix:///?socket=$work/nbdkit.sock"
)

# cwd = work dir, so fio leaves no state files in the repository.
fio_run() { # json-out uri rw bs iodepth [more fio args]
    local out=$1 target=$2 rw=$3 bs=$4 depth=$5
    shift 5
    (cd "$work" && fio --name=bench --ioengine=nbd --uri="$target" --rw="$rw" --bs="$bs" \
        --iodepth="$depth" --numjobs=1 --size="$size" --output-format=json --output="$out" "$@")
}

# Reads must hit written data, not holes (nbdkit would answer those from a sparse file).
fio_run "$work/prefill-firn.json" "${uri[firn-tcp]}" write 1M 8
fio_run "$work/prefill-nbdkit.json" "${uri[nbdkit-tcp]}" write 1M 8
echo "prefilled both exports ($size each, sequential 1 MiB writes)"
echo

cpu_ticks() { # pid... -> utime+stime summed over all threads, in clock ticks
    local total=0 pid stat
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat")
        stat=${stat##*) } # the command name may contain spaces; fields after it don't
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# One value (IOPS or MiB/s) and the bytes moved, from fio's JSON.
fio_result() { # json-file iops|mibs
    python3 - "$1" "$2" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
r, w = job["read"], job["write"]
moved = r["io_bytes"] + w["io_bytes"]
if sys.argv[2] == "iops":
    print(f"{r['iops'] + w['iops']:.0f}", moved)
else:
    print(f"{(r['bw_bytes'] + w['bw_bytes']) / 2**20:.1f}", moved)
PY
}

jobs=( # name rw bs iodepth unit
    "randwrite-4k randwrite 4k 32 iops"
    "randread-4k randread 4k 32 iops"
    "seqwrite-1m write 1M 8 mibs"
    "seqread-1m read 1M 8 mibs"
)
ratios=()
declare -A moved=([firn]=0 [nbdkit]=0)
firn_cpu0=$(cpu_ticks "$firn_pid")
nbdkit_cpu0=$(cpu_ticks "${nbdkit_pids[@]}")

for transport in tcp unix; do
    for job in "${jobs[@]}"; do
        read -r name rw bs depth unit <<<"$job"
        declare -A value=()
        # Alternate servers job by job so background load hits both alike.
        for server in firn nbdkit; do
            out="$work/$name-$transport-$server.json"
            fio_run "$out" "${uri[$server-$transport]}" "$rw" "$bs" "$depth" \
                --time_based --runtime="$runtime"
            read -r v bytes < <(fio_result "$out" "$unit")
            value[$server]=$v
            moved[$server]=$((moved[$server] + bytes))
        done
        label=$([ "$unit" = iops ] && echo IOPS || echo MiB/s)
        printf '%-24s firn %10s %-5s   nbdkit %10s %s\n' "nbd-$name-$transport" \
            "${value[firn]}" "$label" "${value[nbdkit]}" "$label"
        ratios+=("$(python3 -c "print(f'ratio: nbd-$name-$transport {${value[firn]} / ${value[nbdkit]}:.2f}')")")
    done
done

firn_cpu1=$(cpu_ticks "$firn_pid")
nbdkit_cpu1=$(cpu_ticks "${nbdkit_pids[@]}")

echo
python3 - "$(getconf CLK_TCK)" "$((firn_cpu1 - firn_cpu0))" "${moved[firn]}" \
    "$((nbdkit_cpu1 - nbdkit_cpu0))" "${moved[nbdkit]}" <<'PY'
import sys
hz = int(sys.argv[1])
per_gib = {}
for name, ticks, moved in (("firn", sys.argv[2], sys.argv[3]), ("nbdkit", sys.argv[4], sys.argv[5])):
    cpu, gib = int(ticks) / hz, int(moved) / 2**30
    per_gib[name] = cpu / gib
    print(f"cpu: {name:<6} {cpu:7.2f} s user+sys for {gib:7.2f} GiB moved = {per_gib[name]:.3f} s/GiB")
print("(server CPU over all timed jobs, both transports; fio's own CPU not counted)")
PY
echo
printf '%s\n' "${ratios[@]}"
python3 -c "
f, n = $((firn_cpu1 - firn_cpu0)) / ${moved[firn]}, $((nbdkit_cpu1 - nbdkit_cpu0)) / ${moved[nbdkit]}
print(f'ratio: nbd-cpu-per-gib {f / n:.2f}    (CPU seconds per GiB, firn / nbdkit: LOWER is better)')"
