#!/bin/bash
# Cluster failover: start three nodes on loopback, then ROUNDS times kill -9 a leader and time
# from the kill to the first change committed through a survivor, retried until it succeeds;
# the killed node is restarted and caught up before the next round.
#   GROUP=queues (default): the queue group's leader, which serves the replicated queues (the
#                           nodes run one queue group); the change is a publish to a replicated
#                           queue.
#   GROUP=metadata:         the metadata group's leader; the change is a queue declare.
#
#   cargo build --release -p hopper-broker -p hopper-cli && scripts/failover.sh
set -u
B=${BIN_DIR:-target/release}
ROUNDS=${ROUNDS:-20}
GROUP=${GROUP:-queues}
D=$(mktemp -d)
trap 'pkill -f "hopperd --data-dir $D" ; rm -rf "$D"' EXIT
P="1=127.0.0.1:7201,2=127.0.0.1:7202,3=127.0.0.1:7203"
H() { "$B/hopper" --server "127.0.0.1:721$1" "${@:2}"; }
start() {
  "$B/hopperd" --data-dir "$D/n$1" --listen "127.0.0.1:721$1" --http off --node-id "$1" \
    --cluster-listen "127.0.0.1:720$1" --peers "$P" --queue-groups 1 >> "$D/n$1.log" 2>&1 &
  echo $! > "$D/pid$1"
}
# The leader node $1 knows of in the chosen group; empty if none.
leader_seen_by() {
  H "$1" cluster status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
print((s["queue_leaders"][0] if sys.argv[1] == "queues" else s["leader"]) or "")' "$GROUP" 2>/dev/null
}
change() {
  if [ "$GROUP" = queues ]; then H "$1" publish orders "round $2"; else H "$1" queue declare "q$2"; fi
}
# Whether node $1 holds what round $2 changed.
caught_up() {
  if [ "$GROUP" = queues ]; then
    [ "$(H "$1" queue stats orders --json 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["ready"])' 2>/dev/null)" = "$2" ]
  else
    H "$1" queue list 2>/dev/null | grep -q "^q$2 "
  fi
}
for i in 1 2 3; do start "$i"; done
until H 1 queue declare orders --replicated >/dev/null 2>&1; do :; done
for round in $(seq "$ROUNDS"); do
  leader=""
  until [ -n "$leader" ]; do
    for i in 1 2 3; do leader=$(leader_seen_by "$i"); [ -n "$leader" ] && break; done
  done
  survivor=$(( leader % 3 + 1 ))
  kill -9 "$(cat "$D/pid$leader")"
  killed=$(date +%s.%N)
  until change "$survivor" "$round" >/dev/null 2>&1; do :; done
  echo "round $round: $GROUP leader $leader killed; first change through node $survivor after $(echo "$(date +%s.%N) - $killed" | bc) s"
  start "$leader"
  # The restarted node must have caught up before the next kill.
  until caught_up "$leader" "$round"; do :; done
done
