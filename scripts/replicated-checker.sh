#!/bin/bash
# Kills the node serving a replicated queue KILLS times (default 30) while a publisher and a
# consumer run through the CLI, then checks that every confirmed message was delivered
# (confirmed ⊆ delivered ∪ queued, the queue drained at the end) and that every second
# delivery of a message was flagged redelivered. Exits 1 on a lost message.
#
#   cargo build --release -p hopper-broker -p hopper-cli && scripts/replicated-checker.sh
set -u
B=${BIN_DIR:-target/release}
KILLS=${KILLS:-30}
D=$(mktemp -d)
trap 'kill $PUBLISHER $CONSUMER 2>/dev/null; pkill -f "hopperd --data-dir $D"; rm -rf "$D"' EXIT
P="1=127.0.0.1:7501,2=127.0.0.1:7502,3=127.0.0.1:7503"
ALL=127.0.0.1:7511,127.0.0.1:7512,127.0.0.1:7513
start() {
  "$B/hopperd" --data-dir "$D/n$1" --listen "127.0.0.1:751$1" --http off --node-id "$1" \
    --cluster-listen "127.0.0.1:750$1" --peers "$P" >> "$D/n$1.log" 2>&1 &
  echo $! > "$D/pid$1"
}
# The node serving the queue, as two nodes of the three agree; empty while they do not.
serving() {
  for i in 1 2 3; do
    "$B/hopper" --server "127.0.0.1:751$i" queue stats checked --json 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["served_by"] or "")' 2>/dev/null
  done | grep . | sort | uniq -c | awk '$1 >= 2 {print $2}' | head -1
}
for i in 1 2 3; do start "$i"; done
until "$B/hopper" --server "$ALL" queue declare checked --replicated >/dev/null 2>&1; do :; done

# The publisher: one message at a time, through whichever node answers; confirmed ones noted.
(
  n=0
  while :; do
    n=$((n + 1))
    if "$B/hopper" --server "$ALL" publish checked "m-$n" >/dev/null 2>&1; then echo "m-$n"; fi
  done
) > "$D/confirmed" &
PUBLISHER=$!

# The consumer: at the serving node, acking each message after printing it.
consume_once() {
  local node
  node=$(serving)
  [ -n "$node" ] || return
  "$B/hopper" --server "127.0.0.1:751$node" consume checked --json --prefetch 50 --count "$1" 2>/dev/null
}
( while :; do consume_once 200; done ) > "$D/delivered" &
CONSUMER=$!

for round in $(seq "$KILLS"); do
  node=""
  until [ -n "$node" ]; do node=$(serving); done
  kill -9 "$(cat "$D/pid$node")"
  echo "kill $round: node $node"
  # Another node serves before the killed one comes back, and it catches up before the next
  # kill.
  until next=$(serving) && [ -n "$next" ] && [ "$next" != "$node" ]; do :; done
  start "$node"
  sleep 1
done
kill "$PUBLISHER"
wait "$PUBLISHER" 2>/dev/null
sleep 2
kill "$CONSUMER"
wait "$CONSUMER" 2>/dev/null
# Drain what is left, asking for exactly that many.
while :; do
  left=$("$B/hopper" --server "$ALL" queue stats checked --json 2>/dev/null |
    python3 -c 'import json, sys; q = json.load(sys.stdin); print(q["ready"] + q["unacked"])')
  [ "$left" = 0 ] && break
  [ -n "$left" ] && consume_once "$left" >> "$D/delivered"
done
python3 - "$D/confirmed" "$D/delivered" <<'EOF'
import json, sys
confirmed = [line.strip() for line in open(sys.argv[1]) if line.strip()]
seen, duplicates, unflagged = set(), 0, 0
for line in open(sys.argv[2]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    message = json.loads(line)
    if message["body"] in seen:
        duplicates += 1
        unflagged += not message["redelivered"]
    seen.add(message["body"])
lost = [body for body in confirmed if body not in seen]
print(f"confirmed {len(confirmed)}, delivered {len(seen)} distinct, {duplicates} delivered again "
      f"({unflagged} of them not flagged redelivered), lost {len(lost)}: {lost[:10]}")
sys.exit(1 if lost or unflagged else 0)
EOF
