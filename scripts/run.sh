#!/usr/bin/env bash
# `make run`: start blockd on a state dir in the repo, make sure a 1 GiB
# `demo` volume exists, print how to use it, and stay in the foreground
# until Ctrl-C (which stops blockd cleanly).
set -euo pipefail
BIN=${BIN:-bin/blockd}
STATE=${STATE:-$PWD/state}
NBD=${NBD_LISTEN:-127.0.0.1:10809}
METRICS=${METRICS_LISTEN:-127.0.0.1:9810}
SOCK=$STATE/blockd.sock
mkdir -p "$STATE"
"$BIN" serve --state-dir "$STATE" --nbd-listen "$NBD" --metrics-listen "$METRICS" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' INT TERM
for _ in $(seq 1 200); do
  "$BIN" volume list --api-socket "$SOCK" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { wait $pid; exit 1; }
  sleep 0.05
done
"$BIN" volume get demo --api-socket "$SOCK" >/dev/null 2>&1 ||
  "$BIN" volume create demo --size 1GiB --api-socket "$SOCK" >/dev/null
cat <<MSG

blockd is running (pid $pid, state in $STATE). Try, in another terminal:

  nbdinfo nbd://$NBD/demo
  nbdinfo --list nbd://$NBD
  fio --name=demo --ioengine=nbd --uri=nbd://$NBD/demo --rw=randrw --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://$NBD/demo
  export BLOCKD_API_SOCKET=$SOCK
  $BIN volume list
  $BIN volume create data --size 10GiB --profile db
  curl -s http://$METRICS/metrics | grep blockd_volume

Ctrl-C stops blockd (in-flight requests finish, data is flushed).
MSG
wait $pid
