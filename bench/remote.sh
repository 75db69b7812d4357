#!/usr/bin/env bash
# firn's remote layer against rclone, same data, same Garage bucket, one run.
#
#   bench/remote.sh [large-size] [small-count]      defaults: 1G 2000
#
# Prints `ratio: <name> <firn/rclone>` lines: throughput ratios, higher is better for firn.
# Both tools get the same concurrency (16 objects, 8 parts of 16 MiB in flight per object).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
unset AWS_CA_BUNDLE # breaks S3 clients talking plain HTTP

large_size=${1:-1G}
small_count=${2:-2000}

cargo build --release --quiet
work=$(mktemp -d -t firn-bench-remote.XXXXXX)
# A copy, so a build in a shared target directory cannot swap the binary mid-run.
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/firn" "$work/firn"
firn=$work/firn
cleanup() {
    bash scripts/garage.sh stop "$work/garage" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
bash scripts/garage.sh start "$work/garage" >/dev/null
# shellcheck source=/dev/null
source "$work/garage/env"

echo "data: one $large_size file, $small_count files of 64 KiB (random)"
mkdir -p "$work/large" "$work/small"
head -c "$large_size" /dev/urandom >"$work/large/big.bin"
python3 - "$work/small" "$small_count" <<'PY'
import os, sys
for i in range(int(sys.argv[2])):
    with open(os.path.join(sys.argv[1], f"f{i:05}.bin"), "wb") as f:
        f.write(os.urandom(64 * 1024))
PY

write_config() { # prefix upload-rate
    cat >"$work/firn.toml" <<TOML
[remote]
kind = "s3"
endpoint = "$FIRN_TEST_S3_ENDPOINT"
bucket = "$FIRN_TEST_S3_BUCKET"
region = "$FIRN_TEST_S3_REGION"
access_key_id = "$FIRN_TEST_S3_ACCESS_KEY_ID"
secret_access_key = "$FIRN_TEST_S3_SECRET_ACCESS_KEY"
prefix = "$1"
part_size = "16MiB"
part_concurrency = 8
[remote.bandwidth]
upload = "$2"
[local]
data_dir = "$work/firn-data"
TOML
}

export RCLONE_CONFIG_BENCH_TYPE=s3
export RCLONE_CONFIG_BENCH_PROVIDER=Other
export RCLONE_CONFIG_BENCH_ENDPOINT=$FIRN_TEST_S3_ENDPOINT
export RCLONE_CONFIG_BENCH_REGION=$FIRN_TEST_S3_REGION
export RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=$FIRN_TEST_S3_ACCESS_KEY_ID
export RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=$FIRN_TEST_S3_SECRET_ACCESS_KEY
export RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true
rclone_flags=(--transfers 16 --checkers 16 --s3-upload-concurrency 8 --s3-chunk-size 16M --s3-upload-cutoff 32M)

# Seconds a command takes.
timed() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    python3 -c "print(f'{$end - $start:.3f}')"
}

ratio() { # name firn-seconds rclone-seconds (throughput ratio = rclone time / firn time)
    python3 -c "print(f'ratio: $1 {$3 / $2:.2f}    (firn {$2}s, rclone {$3}s)')"
}

write_config bench-firn unlimited
bucket=bench:$FIRN_TEST_S3_BUCKET

f=$(timed "$firn" remote --config "$work/firn.toml" put "$work/large/big.bin" large/big.bin)
r=$(timed rclone copy "${rclone_flags[@]}" "$work/large" "$bucket/bench-rclone/large")
ratio remote-put-large "$f" "$r"

f=$(timed "$firn" remote --config "$work/firn.toml" put --jobs 16 "$work/small" small)
r=$(timed rclone copy "${rclone_flags[@]}" "$work/small" "$bucket/bench-rclone/small")
ratio remote-put-small "$f" "$r"

f=$(timed "$firn" remote --config "$work/firn.toml" get large/big.bin "$work/out-firn/big.bin")
r=$(timed rclone copy "${rclone_flags[@]}" "$bucket/bench-rclone/large" "$work/out-rclone/large")
ratio remote-get-large "$f" "$r"

f=$(timed "$firn" remote --config "$work/firn.toml" get --jobs 16 small/ "$work/out-firn/small")
r=$(timed rclone copy "${rclone_flags[@]}" "$bucket/bench-rclone/small" "$work/out-rclone/small")
ratio remote-get-small "$f" "$r"

cmp "$work/large/big.bin" "$work/out-firn/big.bin"
cmp "$work/large/big.bin" "$work/out-rclone/large/big.bin"
diff -rq "$work/small" "$work/out-firn/small" >/dev/null
echo "downloads match the source (cmp)"

# The limiter at 20 MiB/s: 50 objects of 4 MiB, 4 in flight.
mkdir -p "$work/limited"
for i in $(seq 1 50); do head -c 4M /dev/urandom >"$work/limited/l$i.bin"; done
write_config bench-limited 20MiB
s=$(timed "$firn" remote --config "$work/firn.toml" put --jobs 4 "$work/limited" limited)
python3 -c "rate = 200 / $s; print(f'limiter: 200 MiB at 20 MiB/s took {$s}s = {rate:.2f} MiB/s, accuracy {rate / 20:.3f}')"
