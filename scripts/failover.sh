#!/bin/bash
# Cluster failover: start three nodes on loopback, then 20 times kill -9 the leader and time
# from the kill to the first metadata change committed through a survivor (a queue declare,
# retried until it succeeds); the killed node is restarted before the next round.
#
#   cargo build --release -p hopper-broker -p hopper-cli && scripts/failover.sh
set -u
B=${BIN_DIR:-target/release}
ROUNDS=${ROUNDS:-20}
D=$(mktemp -d)
trap 'pkill -f "hopperd --data-dir $D" ; rm -rf "$D"' EXIT
P="1=127.0.0.1:7201,2=127.0.0.1:7202,3=127.0.0.1:7203"
start() {
  "$B/hopperd" --data-dir "$D/n$1" --listen "127.0.0.1:721$1" --http off --node-id "$1" \
    --cluster-listen "127.0.0.1:720$1" --peers "$P" >> "$D/n$1.log" 2>&1 &
  echo $! > "$D/pid$1"
}
leader_seen_by() {
  "$B/hopper" --server "127.0.0.1:721$1" cluster status --json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"] or "")' 2>/dev/null
}
for i in 1 2 3; do start "$i"; done
for round in $(seq "$ROUNDS"); do
  leader=""
  until [ -n "$leader" ]; do
    for i in 1 2 3; do leader=$(leader_seen_by "$i"); [ -n "$leader" ] && break; done
  done
  survivor=$(( leader % 3 + 1 ))
  kill -9 "$(cat "$D/pid$leader")"
  killed=$(date +%s.%N)
  until "$B/hopper" --server "127.0.0.1:721$survivor" queue declare "q$round" >/dev/null 2>&1; do :; done
  echo "round $round: leader $leader killed; first change through node $survivor after $(echo "$(date +%s.%N) - $killed" | bc) s"
  start "$leader"
  # The restarted node must have caught up before the next kill: it lists the queue declared
  # while it was down.
  until "$B/hopper" --server "127.0.0.1:721$leader" queue list 2>/dev/null | grep -q "^q$round "; do :; done
done
