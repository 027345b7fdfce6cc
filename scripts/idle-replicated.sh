#!/bin/bash
# 1,000 idle replicated queues on three nodes: each node's RSS before and after declaring them,
# and its CPU over 20 s at rest.
#
#   cargo build --release -p hopper-broker -p hopper-cli && scripts/idle-replicated.sh
set -u
B=${BIN_DIR:-target/release}
QUEUES=${QUEUES:-1000}
D=$(mktemp -d)
trap 'pkill -f "hopperd --data-dir $D"; rm -rf "$D"' EXIT
P="1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403"
for i in 1 2 3; do
  "$B/hopperd" --data-dir "$D/n$i" --listen "127.0.0.1:741$i" --http off --node-id "$i" \
    --cluster-listen "127.0.0.1:740$i" --peers "$P" >> "$D/n$i.log" 2>&1 &
  echo $! > "$D/pid$i"
done
until "$B/hopper" --server 127.0.0.1:7411 queue declare warmup --replicated >/dev/null 2>&1; do :; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$(cat "$D/pid$1")/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$(cat "$D/pid$1")/stat"; }
before=(0 "$(rss 1)" "$(rss 2)" "$(rss 3)")
seq "$QUEUES" | xargs -P 8 -I{} "$B/hopper" --server 127.0.0.1:7411 queue declare "r{}" --replicated >/dev/null
sleep 5
after=(0 "$(rss 1)" "$(rss 2)" "$(rss 3)")
start=(0 "$(ticks 1)" "$(ticks 2)" "$(ticks 3)")
sleep 20
hz=$(getconf CLK_TCK)
for i in 1 2 3; do
  used=$(( $(ticks "$i") - ${start[$i]} ))
  echo "node $i: RSS ${before[$i]} -> ${after[$i]} kB ($(( (${after[$i]} - ${before[$i]}) * 1024 / QUEUES )) bytes per queue); CPU at rest $(echo "scale=2; 100 * $used / $hz / 20" | bc) %"
done
"$B/hopper" --server 127.0.0.1:7411 queue list | grep -c '^r' | xargs echo "replicated queues listed:"
