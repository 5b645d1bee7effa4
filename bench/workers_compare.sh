#!/bin/bash
# pop3gw --workers 1 beside --workers 2 (or $WORKERS): POP3 sessions/s and
# submissions/s at $CONC clients, the two servers measured one after the
# other within each of $REPEATS rounds, with server CPU (the supervisor and
# its workers) from /proc.  Loopback only; both servers are stopped by PID
# and their data directories removed at the end.
#
#   bench/workers_compare.sh            # twistd and pop3gw from $PATH
#   BIN=.venv/bin REPEATS=5 bench/workers_compare.sh
#
# Settings: BIN (where twistd and pop3gw are), WORKERS (2), REPEATS (3),
# CONC (8), USERS (16), DURATION (5 s of POP3 sessions), COUNT (600 submissions), SIZE (4096),
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
COUNT=${COUNT:-600}
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
    "$BIN/twistd" -n --pidfile= --logfile="$ROOT/log$n" pop3gw --data-dir "$ROOT/w$n" --domain example.org \
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
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$REPEATS"); do
    for n in 1 "$WORKERS"; do
        echo "== round $r --workers $n: POP3 sessions"
        python3 "$HERE/pop3_load.py" sessions --port "${POP3[$n]}" --user 'u{i}@example.org' --password pw \
            --concurrency "$CONC" --users "$USERS" --seconds "$DURATION" --pid "${PID[$n]}" 2>&1 | grep -v '^$' || true
    done
    for n in 1 "$WORKERS"; do
        echo "== round $r --workers $n: submissions"
        python3 "$HERE/smtp_load.py" --port "${SMTP[$n]}" --user 'u{i}@example.org' --password pw \
            --rcpt sink@example.org --count "$COUNT" --concurrency "$CONC" --users "$USERS" --size "$SIZE" \
            --maildir "$ROOT/w$n/mail/example.org/sink" --pid "${PID[$n]}" 2>&1 | grep -v '^$' || true
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
