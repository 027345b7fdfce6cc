#!/usr/bin/env bash
# A soak test of the broker under mixed traffic and killed clients; not run in CI (see
# docs/operations.md).
#
# Starts target/release/hopperd on a free loopback port with a temporary data directory and,
# for SOAK_SECONDS (default 600), runs mixed traffic with target/release/hopper against durable
# and transient queues that dead-letter into one queue: publishes (some delayed or with a TTL),
# consumers that ack, requeue, reject or hold, pulls, peeks, moves out of the dead-letter queue
# and small benches. Clients are killed with SIGKILL at random along the way; the broker never
# is. At the end, once every client is gone, it checks from `hopper queue list --json`:
#   - every queue's books balance: published = acked + ready + unacked + delayed + dead-lettered
#     + moved out, so no message the broker accepted was lost;
#   - every confirmed publish is counted, and the dead-letter queue received every dead message;
#   - after every queue is deleted, the broker's RSS is back within RSS_SLACK_MB of its start.
# It reports both and exits non-zero on a mismatch. It builds nothing: run `make release`
# first. Set BIN_DIR to take the binaries from elsewhere.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
HOPPERD="$BIN_DIR/hopperd"
HOPPER="$BIN_DIR/hopper"
SOAK_SECONDS=${SOAK_SECONDS:-600}
# How far above its starting RSS the broker may end, once its queues are deleted.
RSS_SLACK_MB=${RSS_SLACK_MB:-64}
# How long the broker may take to announce its address.
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-30}
# How long a client may still run once the soak is over before it is stopped.
DRAIN_TIMEOUT_S=${DRAIN_TIMEOUT_S:-15}
# How long the queues may take to settle (moves ending, deliveries returning) at the end.
SETTLE_TIMEOUT_S=${SETTLE_TIMEOUT_S:-60}

DLQ=soak.dlq
DURABLE=(soak.d1 soak.d2)
TRANSIENT=(soak.t1 soak.t2)
ORIGINS=("${DURABLE[@]}" "${TRANSIENT[@]}")

for bin in "$HOPPERD" "$HOPPER"; do
    if [[ ! -x "$bin" ]]; then
        echo "soak.sh: $bin not found; run 'make release' first" >&2
        exit 1
    fi
done
if ! command -v jq >/dev/null; then
    echo "soak.sh: jq is needed to read the broker's JSON" >&2
    exit 1
fi

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/hopper-soak.XXXXXX")
data_dir="$run_dir/data"
broker_log="$run_dir/hopperd.log"
mkdir -p "$data_dir" "$run_dir/clients" "$run_dir/moves"
broker_pid=""
workers=()

cleanup() {
    local pid
    for pid in "${workers[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $(ls "$run_dir/clients" 2>/dev/null); do
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ -n "$broker_pid" ]] && kill -0 "$broker_pid" 2>/dev/null; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# hopperd allocates with jemalloc, whose background threads give freed memory back to the
# system within seconds (see the RSS check at the end).
"$HOPPERD" --listen 127.0.0.1:0 --http off --data-dir "$data_dir" >/dev/null 2>"$broker_log" &
broker_pid=$!
addr=""
deadline=$((SECONDS + STARTUP_TIMEOUT_S))
listening() { sed -n 's/.*hopperd: listening on \([^ ]*\).*/\1/p' "$broker_log" | head -n 1; }
until addr=$(listening) && [[ -n "$addr" ]]; do
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "soak.sh: hopperd exited before listening:" >&2
        cat "$broker_log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "soak.sh: hopperd did not announce its address within ${STARTUP_TIMEOUT_S}s" >&2
        exit 1
    fi
    sleep 0.05
done
export HOPPER_SERVER=$addr

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$broker_pid/status"; }
hopper() { "$HOPPER" "$@"; }
pick() { local options=("$@"); echo "${options[RANDOM % ${#options[@]}]}"; }

hopper queue declare "$DLQ" --durable >/dev/null
for q in "${DURABLE[@]}"; do
    hopper queue declare "$q" --durable --dead-letter "$DLQ" --max-deliveries 3 \
        --retry-backoff 100ms,500ms --ack-timeout 2s >/dev/null
done
hopper queue declare soak.t1 --dead-letter "$DLQ" --max-deliveries 2 --message-ttl 20s >/dev/null
hopper queue declare soak.t2 --dead-letter "$DLQ" --max-deliveries 4 --max-length 2000 \
    --overflow drop-head >/dev/null
start_rss=$(rss_kb)
echo "hopperd $("$HOPPERD" --version | awk '{print $2}') (pid $broker_pid) on $addr, data in $data_dir"
echo "soaking for ${SOAK_SECONDS}s; broker RSS at start $((start_rss / 1024)) MiB"
end_at=$((EPOCHSECONDS + SOAK_SECONDS))

# Runs one CLI command as a client the chaos loop may kill; its pid is listed while it runs.
# Returns the command's exit status (137 when it was killed). Standard input is passed on
# explicitly: a background command would otherwise read /dev/null.
client() {
    local pid status=0
    "$HOPPER" "$@" <&0 >/dev/null 2>>"$run_dir/clients.log" &
    pid=$!
    : >"$run_dir/clients/$pid"
    # The shell's own "Killed" notice for a client the chaos loop ended is not news.
    { wait "$pid" || status=$?; } 2>/dev/null
    rm -f "$run_dir/clients/$pid"
    return "$status"
}

# Bodies of `n` messages, `size` bytes each (at least the numbering).
bodies() {
    local n=$1 size=$2 pad i
    pad=$(head -c "$size" /dev/zero | tr '\0' x)
    for ((i = 0; i < n; i++)); do
        echo "$i-$pad"
    done
}

# Publishes batches to `queue`; logs "queue attempted confirmed" per batch. Confirmed counts
# only batches whose client exited 0: a killed one may have had part of its batch accepted.
# A pause between batches paces publishing so that the consumers keep up and backlogs stay
# bounded: the soak is about a steady state, not about filling memory.
publisher() {
    local queue=$1 n options
    RANDOM=$BASHPID
    while ((EPOCHSECONDS < end_at)); do
        sleep "0.$((RANDOM % 5))"
        n=$((1 + RANDOM % 100))
        options=$(pick "" "" "" "" "--delay 1s" "--ttl 10s" "--header kind=soak")
        bodies "$n" $((RANDOM % 256)) >"$run_dir/bodies.$BASHPID"
        # shellcheck disable=SC2086 # options is zero or more words
        if client publish "$queue" $options <"$run_dir/bodies.$BASHPID"; then
            echo "$queue $n $n" >>"$run_dir/published.log"
        else
            echo "$queue $n 0" >>"$run_dir/published.log"
        fi
    done
}

# Takes messages off the queues with push consumers and pulls, settling them every way.
consumer() {
    local queue action why
    RANDOM=$BASHPID
    while ((EPOCHSECONDS < end_at)); do
        queue=$(pick "${ORIGINS[@]}" "$DLQ")
        action=$(pick ack ack ack ack requeue reject hold)
        why=()
        if [[ $action == requeue || $action == reject ]]; then
            why=(--error "soak $action")
        fi
        if ((RANDOM % 3)); then
            client consume "$queue" --count $((1 + RANDOM % 300)) --prefetch $((1 + RANDOM % 100)) \
                --action "$action" "${why[@]}" || true
        else
            client get "$queue" --count $((1 + RANDOM % 50)) --wait 1s --visibility 3s \
                --action "$action" "${why[@]}" || true
        fi
    done
}

# Looks without taking, moves dead messages back, runs small benches, and samples the moves'
# progress (the broker keeps only the latest finished moves).
operator() {
    RANDOM=$BASHPID
    while ((EPOCHSECONDS < end_at)); do
        case $((RANDOM % 6)) in
            0) client queue move "$DLQ" --limit $((1 + RANDOM % 300)) || true ;;
            1) client bench --count $((1000 + RANDOM % 5000)) --size 64 --prefetch 20 || true ;;
            2) client queue peek "$(pick "${ORIGINS[@]}" "$DLQ")" --count 50 --json || true ;;
            *) client queue list --json || true ;;
        esac
        record_moves
    done
}

# Notes each move's source and progress: the broker lists only its latest finished moves.
record_moves() {
    local moves
    moves=$(hopper queue moves --json 2>/dev/null) || return 0
    jq -r '.[] | "\(.id) \(.source) \(.moved)"' <<<"$moves" | while read -r id source moved; do
        echo "$source $moved" >"$run_dir/moves/$id"
    done
}

# Kills a random running client with SIGKILL, one every 0 to 3 seconds.
chaos() {
    local clients pid
    RANDOM=$BASHPID
    while ((EPOCHSECONDS < end_at)); do
        sleep "$((RANDOM % 3)).$((RANDOM % 10))"
        clients=("$run_dir"/clients/*)
        [[ -e ${clients[0]} ]] || continue
        pid=$(basename "$(pick "${clients[@]}")")
        if kill -9 "$pid" 2>/dev/null; then
            echo "$pid" >>"$run_dir/kills.log"
        fi
    done
}

for q in "${ORIGINS[@]}"; do
    publisher "$q" &
    workers+=($!)
done
for _ in 1 2 3 4; do
    consumer &
    workers+=($!)
done
operator &
workers+=($!)
chaos &
workers+=($!)

# The broker must stay up throughout.
while ((EPOCHSECONDS < end_at)); do
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "soak.sh: FAIL: hopperd died during the soak:" >&2
        tail -n 20 "$broker_log" >&2
        exit 1
    fi
    sleep 1
done
# Each worker finishes its last client; stragglers are stopped after DRAIN_TIMEOUT_S.
deadline=$((SECONDS + DRAIN_TIMEOUT_S))
for pid in "${workers[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
done
for pid in $(ls "$run_dir/clients"); do
    kill "$pid" 2>/dev/null || true
done
wait "${workers[@]}" 2>/dev/null || true
workers=()

# Settle: no move running, no client connected, no delivery outstanding.
deadline=$((SECONDS + SETTLE_TIMEOUT_S))
until [[ $(hopper queue moves --json | jq '[.[] | select(.state == "running")] | length') == 0 &&
    $(hopper queue list --json | jq '[.[] | .unacked + .consumers] | add // 0') == 0 ]]; do
    if ((SECONDS >= deadline)); then
        echo "soak.sh: FAIL: the queues did not settle within ${SETTLE_TIMEOUT_S}s" >&2
        exit 1
    fi
    sleep 0.2
done
record_moves

# The books, read until two reads agree (timers may still move a message to the dead-letter
# queue between reading one queue and the next).
moved_json=$({ cat "$run_dir"/moves/* 2>/dev/null || true; } |
    jq -R 'split(" ") | {(.[0]): (.[1] | tonumber)}' |
    jq -s 'reduce .[] as $m ({}; reduce ($m | to_entries[]) as $e (.; .[$e.key] += $e.value))')
books() {
    hopper queue list --json | jq --argjson moved "$moved_json" 'map({
        name, published, acked, ready, unacked, delayed,
        dead: ([.dead_lettered[]] | add // 0),
        moved_out: ($moved[.name] // 0)
    } | .balance = .published - (.acked + .ready + .unacked + .delayed + .dead + .moved_out))'
}
deadline=$((SECONDS + SETTLE_TIMEOUT_S))
previous=""
while current=$(books) && [[ "$current" != "$previous" ]] && ((SECONDS < deadline)); do
    previous=$current
    sleep 1
done

attempted=$(awk '{n += $2} END {print n + 0}' "$run_dir/published.log")
confirmed=$(awk '{n += $3} END {print n + 0}' "$run_dir/published.log")
moved_total=$(jq '[.[]] | add // 0' <<<"$moved_json")
kills=$(wc -l <"$run_dir/kills.log" 2>/dev/null || echo 0)
origins_json=$(printf '%s\n' "${ORIGINS[@]}" | jq -R . | jq -s .)
read -r origin_published origin_dead dlq_published < <(jq -r --argjson origins "$origins_json" \
    --arg dlq "$DLQ" '[(map(select(.name as $n | $origins | index($n))) | (map(.published) | add),
        (map(.dead) | add)), (.[] | select(.name == $dlq) | .published)] | @tsv' <<<"$current")

echo
echo "== books after ${SOAK_SECONDS}s, $kills clients killed with SIGKILL"
columns='["name", "published", "acked", "ready", "unacked", "delayed", "dead", "moved_out", "balance"]'
jq -r --argjson columns "$columns" '($columns | @tsv), (.[] | [.[$columns[]]] | @tsv)' <<<"$current" |
    column -t
echo "publishes: $attempted attempted, $confirmed confirmed to clients that exited cleanly;" \
    "the origin queues took in $origin_published, $moved_total of them moved back from $DLQ"
echo "dead-letter queue: received $dlq_published of the $origin_dead dead messages"

failures=0
fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}
if [[ $(jq '[.[] | select(.balance != 0)] | length' <<<"$current") != 0 ]]; then
    unbalanced=$(jq -c '[.[] | select(.balance != 0) | {name, balance}]' <<<"$current")
    fail "a queue's books do not balance: $unbalanced"
fi
accepted=$((origin_published - moved_total))
if ((accepted < confirmed || accepted > attempted)); then
    fail "$accepted publishes accepted, but $confirmed were confirmed and $attempted attempted"
fi
if ((dlq_published != origin_dead)); then
    fail "the dead-letter queue received $dlq_published messages, $origin_dead died"
fi

# Memory: delete every queue, then compare the broker's RSS with its start.
for name in $(jq -r '.[].name' <<<"$current"); do
    hopper queue delete "$name" >/dev/null
done
# The broker sums its queues' message memory every 100 ms; give it a few rounds.
deadline=$((SECONDS + 5))
until memory_used=$(hopper status --json | jq .memory_used) && ((memory_used == 0 || SECONDS >= deadline)); do
    sleep 0.2
done
# Freed memory goes back to the system once jemalloc's decay (10 s dirty, then 10 s muzzy) has
# run: wait up to a minute for RSS to come down.
deadline=$((SECONDS + 60))
until end_rss=$(rss_kb) && ((end_rss <= start_rss + RSS_SLACK_MB * 1024 || SECONDS >= deadline)); do
    sleep 1
done
echo "broker RSS: $((start_rss / 1024)) MiB at start, $((end_rss / 1024)) MiB at the end with every" \
    "queue deleted (message memory in use: $memory_used bytes)"
if ((end_rss > start_rss + RSS_SLACK_MB * 1024)); then
    fail "the broker's RSS grew by $(((end_rss - start_rss) / 1024)) MiB (allowed: $RSS_SLACK_MB MiB)"
fi
if ((memory_used != 0)); then
    fail "the broker still accounts $memory_used bytes of messages with no queue left"
fi
if grep -q "panicked" "$broker_log"; then
    fail "the broker logged a panic: $(grep -m 1 panicked "$broker_log")"
fi

kill "$broker_pid"
if ! wait "$broker_pid"; then
    fail "hopperd did not exit cleanly on SIGTERM"
fi
broker_pid=""
if ((failures > 0)); then
    exit 1
fi
echo "soak passed"
