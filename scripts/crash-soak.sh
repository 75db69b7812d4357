#!/usr/bin/env bash
# A crash soak: the kill -9 loop of tests/cached.rs (flushed_writes_survive_repeated_kill_9),
# run far longer than the suite runs it, against a directory bucket and then Garage.
#
#   scripts/crash-soak.sh [cycles] [minutes]      (defaults: 200 cycles, no time limit)
#
# Each cycle writes and flushes a few 4 KiB blocks of a cached volume with qemu-io, starts fio
# writing elsewhere on it, kills firn with SIGKILL at a random moment, restarts it and reads
# the volume back: every flushed block must be unchanged. At the end the upload must drain.
# `minutes` caps each bucket's run (0: no cap); `cycles` 0 runs until that cap. Garage: the
# one FIRN_TEST_S3_* names (scripts/garage.sh's env file), else a throwaway one started here
# when `garage` is installed; SOAK_GARAGE=0 skips it. Prints cycles done per bucket and exits
# non-zero, with the test's message and the log's path, at the first block that changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cycles=${1:-200}
minutes=${2:-0}
if ! [[ $cycles =~ ^[0-9]+$ && $minutes =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [cycles] [minutes]" >&2
    exit 2
fi
if [ "$cycles" = 0 ] && [ "$minutes" = 0 ]; then
    echo "crash-soak: cycles 0 runs until a time limit: give minutes too" >&2
    exit 2
fi
for tool in qemu-io fio nbdcopy; do
    command -v "$tool" >/dev/null || { echo "crash-soak: $tool missing (scripts/test installs it)" >&2; exit 2; }
done

logs=$(mktemp -d -t firn-crash-soak.XXXXXX)
garage_dir=
cleanup() {
    if [ -n "$garage_dir" ]; then
        bash scripts/garage.sh stop "$garage_dir" >/dev/null 2>&1 || true
        rm -rf "$garage_dir"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "crash-soak: building the test"
env -u AWS_CA_BUNDLE cargo test --test cached --no-run --quiet

# One run of the test against `$1` (dir or garage); returns its exit status.
soak() {
    local bucket=$1 log="$logs/$1.log" status=0
    echo "crash-soak: $bucket bucket, $cycles cycles$([ "$minutes" != 0 ] && echo " or $minutes min"), log $log"
    FIRN_SOAK_BUCKET=$bucket FIRN_SOAK_CYCLES=$cycles FIRN_SOAK_MINUTES=$minutes \
        env -u AWS_CA_BUNDLE cargo test --test cached --quiet -- --exact \
        flushed_writes_survive_repeated_kill_9 --nocapture --test-threads 1 >"$log" 2>&1 &
    local pid=$!
    # Progress, at most a line a minute: the newest verified cycle.
    local shown=$SECONDS last
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if ((SECONDS - shown >= 60)); then
            shown=$SECONDS
            last=$(grep -a 'crash soak: cycle' "$log" | tail -n 1 || true)
            [ -n "$last" ] && echo "  $bucket: ${last#crash soak: }"
        fi
    done
    wait "$pid" || status=$?
    local done
    done=$(grep -ac 'crash soak: cycle .* verified' "$log" || true)
    if [ "$status" = 0 ]; then
        grep -a 'crash soak: [0-9]* cycles' "$log" | sed "s/^/  $bucket: /"
        echo "crash-soak: $bucket: PASSED, $done cycles"
    else
        echo "crash-soak: $bucket: FAILED after $done verified cycles (exit $status). The failure:" >&2
        grep -a -A3 'panicked at' "$log" >&2 || tail -n 40 "$log" >&2
        echo "crash-soak: full log: $log" >&2
    fi
    return "$status"
}

failed=0
soak dir || failed=1

if [ "${SOAK_GARAGE:-1}" = 0 ]; then
    echo "crash-soak: Garage skipped (SOAK_GARAGE=0)"
elif [ -z "${FIRN_TEST_S3_ENDPOINT:-}" ] && ! command -v garage >/dev/null; then
    echo "crash-soak: Garage skipped: no FIRN_TEST_S3_ENDPOINT and no garage binary"
else
    if [ -z "${FIRN_TEST_S3_ENDPOINT:-}" ]; then
        garage_dir=$(mktemp -d -t firn-crash-soak-garage.XXXXXX)
        bash scripts/garage.sh start "$garage_dir" >"$logs/garage-start.log"
        # shellcheck source=/dev/null
        source "$garage_dir/env"
    fi
    soak garage || failed=1
fi

if [ "$failed" != 0 ]; then
    echo "crash-soak: FAILED (logs in $logs)" >&2
    exit 1
fi
echo "crash-soak: passed (logs in $logs)"
