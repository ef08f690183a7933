#!/usr/bin/env bash
# Two replicas sharing one fleet, on this machine (docs/replicas.md):
#   a throwaway PostgreSQL cluster (unix socket only, in a temporary directory),
#   `modelip emulate` (4 hosts x 2 cards, ports 62601-62604),
#   two `modelip watch` replicas of plans/replicas.yaml against it;
# then replica a is killed (SIGKILL) and b takes its hosts over.
set -euo pipefail
cd "$(dirname "$0")/.."
M=(.venv/bin/python -m orchestrator)
DIR=state/replicas
PLAN=plans/replicas.yaml
rm -rf "$DIR" && mkdir -p "$DIR"

PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")
PG=$(mktemp -d /tmp/modelip-pg-XXXXXX)
pg() {  # initdb refuses root: run the server as the postgres user
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown postgres "$PG"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pg "$PGBIN/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG"
}
trap cleanup EXIT
pg "$PGBIN/initdb" -D "$PG/data" -A trust -U postgres --no-sync >/dev/null
pg "$PGBIN/pg_ctl" -D "$PG/data" -l "$PG/server.log" -w \
    -o "-k $PG -c listen_addresses=''" start >/dev/null
STORE="postgresql://postgres@/postgres?host=$PG"
echo "PostgreSQL: $STORE"

"${M[@]}" generate-mek -o "$DIR/mek.bin"
"${M[@]}" emulate --hosts 4 --devices-per-host 2 --base-port 62601 --pki-dir "$DIR/pki" \
    > "$DIR/emulate.log" 2>&1 &
pids+=($!)
until grep -q READY "$DIR/emulate.log"; do sleep 0.2; done

for name in a b; do
    "${M[@]}" watch "$PLAN" --json --store "$STORE" --replica "$name" \
        > "$DIR/replica-$name.jsonl" 2> "$DIR/replica-$name.err" &
    pids+=($!)
done
replica_a=${pids[1]}
sleep 15
"${M[@]}" status "$PLAN" --store "$STORE"

echo; echo "--- SIGKILL replica a; b takes its hosts over within the lease TTL ---"
kill -KILL "$replica_a"
sleep 8
grep '"took over"' "$DIR/replica-b.jsonl" | cut -c1-160 || true
"${M[@]}" status "$PLAN" --store "$STORE"
