#!/usr/bin/env bash
# The headline benchmarks of docs/benchmarks.md against a broker of our own.
#
# Starts target/release/hopperd on a free loopback port with a temporary data directory, runs
# the throughput, fixed-rate latency and durable benches with target/release/hopper, prints
# their results and stops the broker again. It builds nothing: run `make release` first (or
# use `make bench`, which does). Set BIN_DIR to take the binaries from elsewhere.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
HOPPERD="$BIN_DIR/hopperd"
HOPPER="$BIN_DIR/hopper"
# How long the broker may take to announce its address.
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-30}

for bin in "$HOPPERD" "$HOPPER"; do
    if [[ ! -x "$bin" ]]; then
        echo "bench.sh: $bin not found; run 'make release' first" >&2
        exit 1
    fi
done

data_dir=$(mktemp -d "${TMPDIR:-/tmp}/hopper-bench.XXXXXX")
broker_log="$data_dir.log"
broker_pid=""

cleanup() {
    if [[ -n "$broker_pid" ]] && kill -0 "$broker_pid" 2>/dev/null; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    rm -rf "$data_dir" "$broker_log"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The HTTP listener is off: benches do not use it, and its fixed default port may be taken.
"$HOPPERD" --listen 127.0.0.1:0 --http off --data-dir "$data_dir" >/dev/null 2>"$broker_log" &
broker_pid=$!

# The broker logs `hopperd: listening on ADDR` once it accepts connections (an HTTP listener
# would log `http listening on` first, hence the prefix).
addr=""
deadline=$((SECONDS + STARTUP_TIMEOUT_S))
while [[ -z "$addr" ]]; do
    addr=$(sed -n 's/.*hopperd: listening on \([^ ]*\).*/\1/p' "$broker_log" | head -n 1)
    if [[ -n "$addr" ]]; then
        break
    fi
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "bench.sh: hopperd exited before listening:" >&2
        cat "$broker_log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "bench.sh: hopperd did not announce its address within ${STARTUP_TIMEOUT_S}s" >&2
        exit 1
    fi
    sleep 0.05
done

echo "hopperd $("$HOPPERD" --version | awk '{print $2}') (pid $broker_pid) on $addr, data in $data_dir"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

run() {
    local title=$1
    shift
    echo
    echo "== $title"
    echo "\$ hopper bench $*"
    "$HOPPER" --server "$addr" bench "$@"
}

run "a. throughput, transient (1 producer, 1 consumer, 256 B, prefetch 100)" \
    --count 1000000 --size 256 --prefetch 100
run "b. latency at a fixed 5,000 msg/s, transient" \
    --rate 5000 --count 100000
run "c. durable with confirms, 1,000 in flight" \
    --durable --confirm-window 1000 --count 500000
run "c. durable at a fixed 100,000 msg/s" \
    --durable --rate 100000 --count 500000
run "c. durable at a fixed 150,000 msg/s" \
    --durable --rate 150000 --count 500000
