#!/bin/bash
# Replicated queue throughput: three nodes on loopback with one queue group (so one node serves
# every replicated queue, the bench's included), `hopper bench --replicated` against that node,
# then the same run on a single node's durable queue.
#
#   cargo build --release -p hopper-broker -p hopper-cli && scripts/replicated-bench.sh
set -u
B=${BIN_DIR:-target/release}
COUNT=${COUNT:-200000}
D=$(mktemp -d)
trap 'pkill -f "hopperd --data-dir $D"; rm -rf "$D"' EXIT
P="1=127.0.0.1:7301,2=127.0.0.1:7302,3=127.0.0.1:7303"
for i in 1 2 3; do
  "$B/hopperd" --data-dir "$D/n$i" --listen "127.0.0.1:731$i" --http off --node-id "$i" \
    --cluster-listen "127.0.0.1:730$i" --peers "$P" --queue-groups 1 >> "$D/n$i.log" 2>&1 &
done
serving=""
until [ -n "$serving" ]; do
  serving=$("$B/hopper" --server 127.0.0.1:7311 cluster status --json 2>/dev/null |
    python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["leader"] and s["queue_leaders"][0] or "")' 2>/dev/null)
done
echo "replicated queue, served by node $serving:"
"$B/hopper" --server "127.0.0.1:731$serving" bench --replicated --count "$COUNT" --size 256 --prefetch 1000 \
  --confirm-window 1000 --json
"$B/hopperd" --data-dir "$D/single" --listen 127.0.0.1:7320 --http off >> "$D/single.log" 2>&1 &
until "$B/hopper" --server 127.0.0.1:7320 status >/dev/null 2>&1; do :; done
echo "single node, durable queue:"
"$B/hopper" --server 127.0.0.1:7320 bench --durable --count "$COUNT" --size 256 --prefetch 1000 \
  --confirm-window 1000 --json
