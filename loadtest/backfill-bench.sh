#!/usr/bin/env bash
# backfill-bench.sh measures a sparse backfill into dimsum and into
# VictoriaMetrics, one after the other, on the same samples: every finest
# series of `dimsum load -series N` gets one count a step over the span
# before now. For each store it prints the settled ingest rate (from the
# load's start until the exact totals are readable through the query API),
# the server's CPU seconds over the run (up to the exact read), its peak RSS,
# and the bytes of its whole data directory per ingested sample, once it
# stopped changing (compactions done) and again after a clean stop.
# docs/benchmarks.md records its figures.
#
#   loadtest/backfill-bench.sh [-series 10000] [-backfill 24h] [-step 1m] [-batch 5000] [-concurrency 4] [-runs 1] [-only dimsum|victoriametrics]
#
# It installs Debian's victoria-metrics when it is missing, builds dimsum
# from this tree, and runs both servers on loopback (ports 19400, 19401 and
# 18428; set DIMSUM_GRPC, DIMSUM_HTTP and VM_HTTP to move them). Both are
# pushed alike, without compression, in batches of -batch samples (5,000),
# -concurrency of them in flight (four). It is not part of `go test ./...`.
set -euo pipefail

series=10000 backfill=24h step=1m batch=5000 concurrency=4 runs=1 only=""
while [ $# -gt 0 ]; do
	case "$1" in
	-series) series=$2 ;;
	-backfill) backfill=$2 ;;
	-step) step=$2 ;;
	-batch) batch=$2 ;;
	-concurrency) concurrency=$2 ;;
	-runs) runs=$2 ;;
	-only) only=$2 ;;
	*) echo "usage: $0 [-series N] [-backfill D] [-step S] [-batch B] [-concurrency C] [-runs R] [-only dimsum|victoriametrics]" >&2; exit 2 ;;
	esac
	shift 2
done
grpc=${DIMSUM_GRPC:-127.0.0.1:19400}
http=${DIMSUM_HTTP:-127.0.0.1:19401}
vm=${VM_HTTP:-127.0.0.1:18428}

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pid=""
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

command -v victoria-metrics >/dev/null || { apt-get update -qq && apt-get install -y -qq victoria-metrics >/dev/null; }
(cd "$root" && go build -o "$work/dimsum" ./cmd/dimsum)

tick=$(getconf CLK_TCK)
# cpu prints the user plus system CPU seconds of a process so far.
cpu() { awk -v t="$tick" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }
# hwm prints a process's peak resident set, in MB.
hwm() { awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
waitfor() {
	for _ in $(seq 600); do curl -sf "$1" >/dev/null && return; sleep 0.1; done
	echo "$1 did not answer" >&2; exit 1
}
bytes() { du -sb "$1" | cut -f1; }
# settle waits until a data directory stops shrinking or growing (its
# compactions done: two readings 5s apart within 1%, at most 2 minutes) and
# prints its size.
settle() {
	local prev cur
	prev=$(bytes "$1")
	for _ in $(seq 24); do
		sleep 5
		cur=$(bytes "$1")
		if [ $((cur > prev ? cur - prev : prev - cur)) -le $((prev / 100)) ]; then break; fi
		prev=$cur
	done
	bytes "$1"
}

load() {
	"$work/dimsum" load -series "$series" -backfill "$backfill" -step "$step" -batch "$batch" -concurrency "$concurrency" -compression none \
		-verify -verify-timeout 2h -report "$work/report.json" "$@" >"$work/load.out" 2>"$work/load.err" ||
		{ cat "$work/load.out" "$work/load.err" >&2; exit 1; }
}

# report prints one line of figures: store, settled rate, CPU, RSS, bytes at
# settle and after stop.
report() {
	local events rate
	events=$(jq .accepted "$work/report.json")
	rate=$(jq '.settled_rate | floor' "$work/report.json")
	awk -v s="$1" -v e="$events" -v r="$rate" -v c="$2" -v m="$3" -v b1="$4" -v b2="$5" 'BEGIN {
		printf "%-16s %10d samples  settled %9d /s  server CPU %7.1f s  peak RSS %6d MB  disk %.3f B/sample settled, %.3f after stop\n", s, e, r, c, m, b1 / e, b2 / e }'
}

run_dimsum() {
	local data=$work/dimsum-data c0 c1 mem settled stopped
	rm -rf "$data"
	printf 'data_dir: %s\ngrpc_listen: %s\nhttp_listen: %s\naggregator: {max_lateness: 48h}\n' "$data" "$grpc" "$http" >"$work/node.yaml"
	"$work/dimsum" -config "$work/node.yaml" -log-level warn 2>"$work/node.log" &
	pid=$!
	waitfor "http://$http/-/healthy"
	c0=$(cpu "$pid")
	load -addr "$grpc" -http "$http"
	c1=$(cpu "$pid")
	mem=$(hwm "$pid")
	settled=$(settle "$data")
	kill -TERM "$pid"
	wait "$pid" || true
	pid=""
	stopped=$(bytes "$data")
	report dimsum "$(echo "$c1 - $c0" | bc)" "$mem" "$settled" "$stopped"
}

run_victoria() {
	local data=$work/vm-data c0 c1 mem settled stopped
	rm -rf "$data"
	victoria-metrics -storageDataPath "$data" -httpListenAddr "$vm" -search.latencyOffset 0s \
		-retentionPeriod 1y -loggerLevel ERROR 2>"$work/vm.log" &
	pid=$!
	waitfor "http://$vm/health"
	c0=$(cpu "$pid")
	load -target victoriametrics -http "$vm"
	c1=$(cpu "$pid")
	mem=$(hwm "$pid")
	settled=$(settle "$data")
	kill -TERM "$pid"
	wait "$pid" || true
	pid=""
	stopped=$(bytes "$data")
	report victoriametrics "$(echo "$c1 - $c0" | bc)" "$mem" "$settled" "$stopped"
}

echo "backfill of $series series, one sample a $step over $backfill, batches of $batch, $concurrency in flight, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$runs"); do
	[ "$only" = victoriametrics ] || run_dimsum
	[ "$only" = dimsum ] || run_victoria
done
