#!/usr/bin/env bash
# `make cluster-down`: stop exactly the processes that deploy/cluster/up.sh recorded in $EMO_ASSETS_CLUSTER_DIR/state
# (webserver, daemon and workers with their process groups, Redis, PostgreSQL). PostgreSQL's data stays, so the
# next cluster-up shows the same run history; `rm -rf .cluster` forgets it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(realpath -m "${EMO_ASSETS_CLUSTER_DIR:-$ROOT/.cluster}")
STATE="$DIR/state"
if [ ! -f "$STATE" ]; then
    echo "cluster-down: nothing to stop ($STATE is missing)"
    exit 0
fi
# shellcheck disable=SC1090
. <(tr ' ' '\n' <"$STATE")

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

stop_group() {  # TERM the process group, KILL what is left after 20 s
    local pgid=$1
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

for name in webserver daemon $(compgen -v PROC_worker | sed 's/^PROC_//'); do
    var="PROC_$name"
    [ -n "${!var:-}" ] && stop_group "${!var}"
done
# Redis rewrites its pid file when it is restarted on the same port, so read the pid there
REDIS_PID=$(cat "$DIR/redis/redis.pid" 2>/dev/null || true)
if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill -TERM "$REDIS_PID"
fi
if [ -n "${PG_DATA:-}" ] && [ -f "$PG_DATA/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
fi
rm -f "$STATE"
echo "cluster down"
