#!/bin/bash
# pop3gw --workers 1 beside --workers 2 (or $WORKERS): POP3 sessions/s and
# submissions/s at $CONC clients, the two servers measured one after the
# other within each of $REPEATS rounds (which one goes first alternates),
# with server CPU (the supervisor and its workers) from /proc, and for the
# workers' server each process's share; a summary at the end gives each
# round's ratio and CPU per operation, with medians and ranges, and how
# many POP3 logins each worker served.  Loopback only; both servers are stopped by PID
# and their data directories removed at the end.
#
#   bench/workers_compare.sh            # twistd and pop3gw from $PATH
#   BIN=.venv/bin REPEATS=5 bench/workers_compare.sh
#
# Settings: BIN (where twistd and pop3gw are), WORKERS (2), REPEATS (3),
# CONC (8), USERS (16), DURATION (5 s of POP3 sessions), COUNT (1500 submissions), SIZE (4096),
# PORT_BASE (21100; the servers use PORT_BASE+10/+87 and +110/+187, below
# Linux's ephemeral range so that no test's port 0 takes them).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${BIN:-$(dirname "$(command -v twistd)")}
WORKERS=${WORKERS:-2}
REPEATS=${REPEATS:-3}
CONC=${CONC:-8}
USERS=${USERS:-16}
DURATION=${DURATION:-5}
COUNT=${COUNT:-1500}
SIZE=${SIZE:-4096}
BASE=${PORT_BASE:-21100}
ROOT=$(mktemp -d /tmp/pop3gw-workers-bench-XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

# No sending limits: the default (200 messages per user and hour) would
# refuse the later rounds' submissions.
printf '[pop3gw]\n\n[limits]\nmessages-per-hour = 0\nrecipients-per-day = 0\n' >"$ROOT/bench.ini"
for n in 1 "$WORKERS"; do
    D=$ROOT/w$n
    mkdir -p "$D"
    for i in $(seq 1 "$USERS"); do printf 'pw\n' | "$BIN/pop3gw" --data-dir "$D" user add "u$i@example.org" >/dev/null 2>&1; done
    printf 'pw\n' | "$BIN/pop3gw" --data-dir "$D" user add sink@example.org >/dev/null 2>&1
    for i in $(seq 1 "$USERS"); do python3 "$HERE/pop3_load.py" seed --maildir "$D/mail/example.org/u$i" --count 20 --size 2048 >/dev/null; done
done

declare -A POP3 SMTP PID
for n in 1 "$WORKERS"; do
    off=$([ "$n" = 1 ] && echo 0 || echo 100)
    POP3[$n]=$((BASE + off + 10)); SMTP[$n]=$((BASE + off + 87))
    "$BIN/twistd" -n --pidfile= --logfile="$ROOT/log$n" pop3gw --config "$ROOT/bench.ini" --data-dir "$ROOT/w$n" --domain example.org \
        --pop3 "tcp:${POP3[$n]}:interface=127.0.0.1" --submission "tcp:${SMTP[$n]}:interface=127.0.0.1" \
        --workers "$n" >/dev/null 2>&1 &
    PID[$n]=$!; PIDS+=("$!")
done
for _ in $(seq 1 120); do
    ready=$(grep -c 'ready: serving' "$ROOT/log$WORKERS" 2>/dev/null || true)
    grep -q "submission listening" "$ROOT/log1" 2>/dev/null && [ "$ready" = "$WORKERS" ] && break
    sleep 1
done
sleep 2
# Warm-up, not counted: every worker checks each user's password once
# (Argon2) before its verified-credentials cache answers, and N workers
# do that N times.
for n in 1 "$WORKERS"; do
    python3 "$HERE/pop3_load.py" sessions --port "${POP3[$n]}" --user 'u{i}@example.org' --password pw \
        --concurrency "$CONC" --users "$USERS" --seconds "$DURATION" >/dev/null 2>&1 || true
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
RESULTS=$ROOT/results.jsonl
# CPU seconds (user + system) of the workers' server's processes, one
# "pid seconds" line each: the supervisor first, then its workers.
cpuSnapshot() {
    local tick; tick=$(getconf CLK_TCK)
    for p in "${PID[$WORKERS]}" $(pgrep -P "${PID[$WORKERS]}"); do
        awk -v p="$p" -v t="$tick" '{ sub(/^.*\) /, ""); printf "%s %.2f\n", p, ($12 + $13) / t }' "/proc/$p/stat" 2>/dev/null
    done
}
showSplit() {  # showSplit BEFORE AFTER: each process's CPU over the run
    join <(sort "$1") <(sort "$2") | awk -v sup="${PID[$WORKERS]}" '{ d = $3 - $2; all += d; n[NR] = $1; c[NR] = d }
        END { if (all <= 0) exit; printf "   CPU split:"; for (i = 1; i <= NR; i++) printf " %s %.2f s (%.0f%%)", (n[i] == sup ? "supervisor" : "worker pid " n[i]), c[i], 100 * c[i] / all; print "" }'
}
for r in $(seq 1 "$REPEATS"); do
    # Alternate which server goes first, so that a drift of the machine's
    # load over a round does not favour one of them.
    if [ $((r % 2)) = 1 ]; then order="1 $WORKERS"; else order="$WORKERS 1"; fi
    for n in $order; do
        echo "== round $r --workers $n: POP3 sessions"
        cpuSnapshot >"$ROOT/cpu0"
        python3 "$HERE/pop3_load.py" sessions --port "${POP3[$n]}" --user 'u{i}@example.org' --password pw \
            --concurrency "$CONC" --users "$USERS" --seconds "$DURATION" --pid "${PID[$n]}" --json 2>&1 >"$ROOT/out" | grep -v '^$' || true
        sed "s/^{/{\"round\": $r, \"workers\": $n, /" "$ROOT/out" >>"$RESULTS"
        cpuSnapshot >"$ROOT/cpu1"; [ "$n" = "$WORKERS" ] && showSplit "$ROOT/cpu0" "$ROOT/cpu1"
    done
    for n in $order; do
        echo "== round $r --workers $n: submissions"
        cpuSnapshot >"$ROOT/cpu0"
        python3 "$HERE/smtp_load.py" --port "${SMTP[$n]}" --user 'u{i}@example.org' --password pw \
            --rcpt sink@example.org --count "$COUNT" --concurrency "$CONC" --users "$USERS" --size "$SIZE" \
            --maildir "$ROOT/w$n/mail/example.org/sink" --pid "${PID[$n]}" --json 2>&1 >"$ROOT/out" | grep -v '^$' || true
        sed "s/^{/{\"round\": $r, \"workers\": $n, /" "$ROOT/out" >>"$RESULTS"
        cpuSnapshot >"$ROOT/cpu1"; [ "$n" = "$WORKERS" ] && showSplit "$ROOT/cpu0" "$ROOT/cpu1"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# The log rotates at 1 MB: count over every file of it (warm-up included).
echo "POP3 logins per worker (--workers $WORKERS, the whole run):" \
    $(cat "$ROOT/log$WORKERS"* | grep -o 'login: service=pop3 .*(worker [0-9]*)$' | grep -o '(worker [0-9]*)' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
# One line per round: rate and server CPU per operation (the supervisor and
# its workers), both servers, and the ratio; then the medians and ranges.
python3 - "$RESULTS" "$WORKERS" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
many = int(sys.argv[2])
for bench, rate, cpu, name in (("pop3-sessions", "sessions_per_s", "server_cpu_ms_per_session", "POP3 sessions/s"),
                               ("smtp-submit", "messages_per_s", "server_cpu_ms_per_message", "submissions/s")):
    got = {(r["round"], r["workers"]): r for r in rows if r.get("bench") == bench}
    rounds = sorted({k[0] for k in got})
    print(f"{name} (server CPU ms per operation in brackets), --workers 1 / --workers {many} / ratio")
    ratios, cpus = [], {1: [], many: []}
    for n in rounds:
        one, two = got.get((n, 1)), got.get((n, many))
        if not one or not two or not one.get(rate) or not two.get(rate):
            continue
        ratio = two[rate] / one[rate]
        ratios.append(ratio)
        cpus[1].append(one.get(cpu))
        cpus[many].append(two.get(cpu))
        print(f"  round {n}: {one[rate]} ({one.get(cpu)}) / {two[rate]} ({two.get(cpu)}) / {ratio:.2f}")
    if ratios:
        print(f"  ratio median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")
        for n in (1, many):
            c = [x for x in cpus[n] if x is not None]
            if c:
                print(f"  --workers {n}: CPU per operation median {statistics.median(c):.3f} ms, range {min(c):.3f}-{max(c):.3f}")
PY
