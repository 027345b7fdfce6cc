#!/usr/bin/env bash
# The AMQP listener side by side (docs/benchmarks.md, "AMQP 0-9-1"), for four workloads:
# transient, durable with confirms, fanout to four queues, and a topic exchange with 1,000
# bindings. Each workload runs
#   - the same peerbench command (lapin) against Hopper's AMQP listener and against RabbitMQ;
#   - `hopper bench --amqp` (a lean AMQP client) against both;
#   - `hopper bench` over Hopper's own protocol.
# Each run prints its throughput and the CPU seconds the client and the broker used, so it
# shows which of the two is the limit.
#
#   PEERBENCH=/path/to/peerbench scripts/amqp-bench.sh
#
# Starts target/release/hopperd (run `make release` first) on free loopback ports with a
# temporary data directory. RabbitMQ is measured too when RABBIT_PID names its running
# beam.smp (its CPU time is read from /proc) and RABBIT_URL (default
# amqp://guest:guest@127.0.0.1:5672/%2f) reaches it. COUNT sets the messages per run
# (default 200000; the fanout runs publish a quarter of it, each message delivered 4 times, to
# four consuming connections as peerbench has).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
HOPPERD="$BIN_DIR/hopperd"
HOPPER="$BIN_DIR/hopper"
PEERBENCH=${PEERBENCH:?set PEERBENCH to the peerbench binary}
RABBIT_URL=${RABBIT_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
RABBIT_PID=${RABBIT_PID:-}
COUNT=${COUNT:-200000}

for bin in "$HOPPERD" "$HOPPER" "$PEERBENCH"; do
    [[ -x "$bin" ]] || { echo "amqp-bench.sh: $bin not found" >&2; exit 1; }
done

data_dir=$(mktemp -d "${TMPDIR:-/tmp}/hopper-amqp-bench.XXXXXX")
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

"$HOPPERD" --listen 127.0.0.1:0 --amqp-listen 127.0.0.1:0 --http off --data-dir "$data_dir" \
    >/dev/null 2>"$broker_log" &
broker_pid=$!
addr=""
for _ in $(seq 1 600); do
    addr=$(sed -n 's/.*hopperd: listening on \([^ ]*\).*/\1/p' "$broker_log" | head -n 1)
    [[ -n "$addr" ]] && break
    kill -0 "$broker_pid" 2>/dev/null || { cat "$broker_log" >&2; exit 1; }
    sleep 0.05
done
amqp=$(sed -n 's/.*hopperd: amqp listening on \([^ ]*\).*/\1/p' "$broker_log" | head -n 1)
hopper_url="amqp://guest:guest@$amqp/%2f"
echo "hopperd $("$HOPPERD" --version | awk '{print $2}') (pid $broker_pid): binary $addr, amqp $amqp"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# CPU seconds (user + system) process $1 has used.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}

# Runs "$@" as the client of the broker whose pid is $1 (after "--"); prints the client's
# last line and both CPU times.
measure() {
    local pid=$1
    shift
    local before after client_cpu out
    before=$(cpu_of "$pid")
    out=$( { /usr/bin/time -f "client_cpu=%U+%S" "$@" 2>&1; } 2>&1 )
    after=$(cpu_of "$pid")
    client_cpu=$(echo "$out" | sed -n 's/.*client_cpu=\([0-9.]*\)+\([0-9.]*\).*/\1 \2/p' | awk '{printf "%.2f", $1 + $2}')
    echo "$out" | grep -v client_cpu | grep -E "system=|consume rate|received|elapsed" | sed 's/^/    /'
    echo "    client cpu ${client_cpu}s, broker cpu $(awk -v a="$after" -v b="$before" 'BEGIN {printf "%.2f", a - b}')s"
}

workload() {
    local title=$1 peer_args=$2 hopper_args=$3
    echo
    echo "== $title"
    echo "-- Hopper, AMQP: peerbench $peer_args"
    # shellcheck disable=SC2086
    measure "$broker_pid" "$PEERBENCH" --url "$hopper_url" $peer_args
    if [[ -n "$RABBIT_PID" ]]; then
        echo "-- RabbitMQ: peerbench $peer_args"
        # shellcheck disable=SC2086
        measure "$RABBIT_PID" "$PEERBENCH" --url "$RABBIT_URL" $peer_args
    fi
    echo "-- Hopper, AMQP: hopper bench --amqp URL $hopper_args"
    # shellcheck disable=SC2086
    measure "$broker_pid" "$HOPPER" bench --amqp "$hopper_url" $hopper_args
    if [[ -n "$RABBIT_PID" ]]; then
        echo "-- RabbitMQ: hopper bench --amqp URL $hopper_args"
        # shellcheck disable=SC2086
        measure "$RABBIT_PID" "$HOPPER" bench --amqp "$RABBIT_URL" $hopper_args
    fi
    echo "-- Hopper, own protocol: hopper bench $hopper_args"
    # shellcheck disable=SC2086
    measure "$broker_pid" "$HOPPER" --server "$addr" bench $hopper_args
}

fanout=$((COUNT / 4))
workload "transient, 1 queue, 256 B, prefetch 100" \
    "--msgs $COUNT" "--count $COUNT"
workload "durable with confirms, 1,000 in flight" \
    "--durable --window 1000 --msgs $COUNT" "--durable --confirm-window 1000 --count $COUNT"
workload "fanout to 4 queues (each message delivered 4 times)" \
    "--exchange fanout --queues 4 --msgs $fanout" "--exchange fanout --queues 4 --consumers 4 --count $fanout"
workload "topic exchange, 1,000 bindings, one matching" \
    "--exchange topic --bindings 1000 --msgs $COUNT" "--exchange topic --bindings 1000 --count $COUNT"
