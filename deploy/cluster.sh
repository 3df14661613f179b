#!/usr/bin/env bash
# A DmaBroker cluster on one machine (SPEC §16): a 3-member etcd cluster and 3 broker replicas
# sharing one group table. Everything runs in the foreground of this script; Ctrl-C (or the
# script's end) stops every process it started, by pid. Needs etcd (Debian: apt-get install
# etcd-server) and a build of the broker (dotnet build src/DmaBroker.Server).
#
#   deploy/cluster.sh [base-port]     # default 23790
#
# etcd members listen for clients on base+0, base+10, base+20 (peers on +1), brokers serve gRPC
# on 50061-50063 and /metrics + the live view on 9471-9473. dmactl can point at any replica:
#   dotnet run --project clients/dmactl -- --broker http://127.0.0.1:50062 sessions
set -euo pipefail
cd "$(dirname "$0")/.."

base=${1:-23790}
run=$(mktemp -d -t dmabroker-cluster-XXXXXX)
pids=()
# Replicas first (they revoke their leases on the way out), then the etcd members.
stop() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  rm -rf "$run"
}
trap stop EXIT INT TERM

command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server" >&2; exit 1; }
broker=src/DmaBroker.Server/bin/Debug/net10.0/DmaBroker.Server.dll
[ -f "$broker" ] || dotnet build src/DmaBroker.Server -v q

initial=""
endpoints=""
for i in 0 1 2; do
  initial+="${initial:+,}m$i=http://127.0.0.1:$((base + 10 * i + 1))"
  endpoints+="${endpoints:+,}http://127.0.0.1:$((base + 10 * i))"
done
token="dmabroker-$(date +%s)"
for i in 0 1 2; do
  client=http://127.0.0.1:$((base + 10 * i)); peer=http://127.0.0.1:$((base + 10 * i + 1))
  etcd --name "m$i" --data-dir "$run/m$i" --logger zap --log-level warn \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token "$token" \
    >"$run/m$i.log" 2>&1 &
  pids+=($!)
done
# The members elect a leader once all three are up; the brokers wait for etcd as they join.
ETCDCTL_API=3 timeout 30 bash -c "until etcdctl --endpoints $endpoints endpoint health >/dev/null 2>&1; do sleep 0.2; done"
echo "etcd: $endpoints"

for i in 1 2 3; do
  dotnet "$broker" --cluster etcd --etcd-endpoints "$endpoints" --replica "r$i" \
    --listen "http://127.0.0.1:$((50060 + i))" --http-listen "http://127.0.0.1:$((9470 + i))" &
  pids+=($!)
done
echo "replicas r1-r3 on http://127.0.0.1:50061-50063; Ctrl-C stops everything"
wait -n "${pids[@]}"
