#!/usr/bin/env bash
# `make cluster-up`: the cluster deployment on this machine, with real services bound to 127.0.0.1 on free ports:
#   PostgreSQL  Dagster's instance storage (runs, event logs, schedules, pool slots) shared by every process
#   Redis       the celery broker (step tasks) and result backend (step events back to the run)
#   N workers   `dagster-celery worker start`, each one process that executes steps (EMO_ASSETS_CELERY_WORKERS, 2)
#   daemon      dequeues runs, launches run workers, runs backfills, schedules, automation and run monitoring
#   webserver   the UI and its GraphQL API (where `emo-assets materialize --deployment cluster` submits jobs)
# Everything lives in $EMO_ASSETS_CLUSTER_DIR (default .cluster/, gitignored): PostgreSQL's data (kept across
# up/down), DAGSTER_HOME, logs, `env` (the variables a client needs: `set -a; . .cluster/env`) and `state` (ports
# and process ids; `deploy/cluster/down.sh` stops exactly those). The caller's EMO_ASSETS_* variables (models,
# datasets, results folder) reach every process.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(realpath -m "${EMO_ASSETS_CLUSTER_DIR:-$ROOT/.cluster}")
BIN=${EMO_ASSETS_BIN:-$ROOT/.venv/bin}
WORKERS=${EMO_ASSETS_CELERY_WORKERS:-2}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)

if [ -z "$PG_BIN" ] || ! command -v redis-server >/dev/null; then
    echo "cluster-up: needs PostgreSQL and Redis: apt-get install -y postgresql redis-server" >&2
    exit 2
fi
# As root, PostgreSQL runs as the postgres user, which must be able to enter every folder above its data: under a
# private folder (a `mktemp -d` one is mode 0700) initdb would fail with "Permission denied" once the rest was up.
if [ "$(id -u)" = 0 ]; then
    existing=$DIR
    while [ ! -d "$existing" ]; do existing=$(dirname "$existing"); done
    blocked="" folder=$existing
    while :; do  # up to /: the highest folder it cannot enter is the cause
        runuser -u postgres -- test -x "$folder" || blocked=$folder
        [ "$folder" = / ] && break
        folder=$(dirname "$folder")
    done
    if [ -n "$blocked" ]; then
        echo "cluster-up: the postgres user cannot enter $blocked ($(stat -c '%A, owner %U' "$blocked")), so PostgreSQL" \
            "cannot use $DIR; nothing was started. Set EMO_ASSETS_CLUSTER_DIR to a folder it can reach (the default" \
            "is .cluster/ in the project) or let it in: chmod o+x $blocked" >&2
        exit 2
    fi
fi
if [ -f "$DIR/state" ]; then
    echo "cluster-up: already up ($DIR/state); run make cluster-down first" >&2
    exit 1
fi
mkdir -p "$DIR/logs" "$DIR/redis" "$DIR/dagster_home"
STATE="$DIR/state"
: > "$STATE"
trap 'echo "cluster-up: failed, stopping what was started (logs in $DIR/logs)" >&2; "$ROOT/deploy/cluster/down.sh"' ERR

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# PostgreSQL refuses to run as root: as root its folder belongs to, and its commands run as, the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

PG_DIR="$DIR/postgres"
PG_PORT=$(free_port)
mkdir -p "$PG_DIR"
[ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >"$DIR/logs/initdb.log"
fi
as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w \
    -o "-k $PG_DIR -p $PG_PORT -c listen_addresses=127.0.0.1" start >/dev/null
echo "PG_BIN=$PG_BIN PG_DATA=$PG_DIR/data PG_PORT=$PG_PORT" >>"$STATE"
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "select 1 from pg_database where datname = 'dagster'" | grep -q 1 ||
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "create database dagster"

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
    --dir "$DIR/redis" --pidfile "$DIR/redis/redis.pid" --logfile "$DIR/logs/redis.log"
for _ in $(seq 50); do [ -s "$DIR/redis/redis.pid" ] && break; sleep 0.1; done
echo "REDIS_PORT=$REDIS_PORT" >>"$STATE"

WEB_PORT=$(free_port)
cp "$ROOT/deploy/cluster/dagster.yaml" "$DIR/dagster_home/dagster.yaml"
cat >"$DIR/env" <<EOF
EMO_ASSETS_DEPLOYMENT=cluster
DAGSTER_HOME=$DIR/dagster_home
EMO_ASSETS_PG_HOST=127.0.0.1
EMO_ASSETS_PG_PORT=$PG_PORT
EMO_ASSETS_PG_USER=postgres
EMO_ASSETS_PG_PASSWORD=
EMO_ASSETS_PG_DB=dagster
EMO_ASSETS_CELERY_BROKER=redis://127.0.0.1:$REDIS_PORT/0
EMO_ASSETS_CELERY_BACKEND=redis://127.0.0.1:$REDIS_PORT/1
EMO_ASSETS_WEBSERVER=http://127.0.0.1:$WEB_PORT
EOF
set -a
. "$DIR/env"
set +a
export PATH="$BIN:$PATH"  # `dagster-celery worker start` runs `celery` from the PATH
cd "$ROOT"
"$BIN/dagster" instance migrate >"$DIR/logs/migrate.log" 2>&1  # create the schema once, before the processes race

# Each long-running process leads its own process group (setsid), so down.sh can stop it with its children
# (a worker's pool process, the daemon's and webserver's code servers, run workers).
start() {
    local name=$1
    shift
    setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo "PROC_$name=$!" >>"$STATE"
}
# Both queues in one -q: celery keeps only the last of repeated -Q options that dagster-celery would pass.
for i in $(seq "$WORKERS"); do
    start "worker$i" "$BIN/dagster-celery" worker start -A dagster_celery.app -y deploy/cluster/celery.yaml \
        -n "worker$i" -q dagster,torch -l WARNING -- --concurrency=1
done
start daemon "$BIN/dagster-daemon" run -w workspace.yaml
start webserver "$BIN/dagster-webserver" -h 127.0.0.1 -p "$WEB_PORT" -w workspace.yaml
echo "WEB_PORT=$WEB_PORT" >>"$STATE"

for _ in $(seq 240); do
    curl -fs "http://127.0.0.1:$WEB_PORT/server_info" >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fs "http://127.0.0.1:$WEB_PORT/server_info" >/dev/null
trap - ERR
echo "cluster up: webserver http://127.0.0.1:$WEB_PORT, PostgreSQL 127.0.0.1:$PG_PORT, Redis 127.0.0.1:$REDIS_PORT," \
    "$WORKERS celery workers; client variables: set -a; . $DIR/env"
