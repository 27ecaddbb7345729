#!/usr/bin/env bash
# The PostgreSQL + Redis half of `make test` needs both on localhost. Start
# one that is installed but stopped; name the Debian package of one that is
# missing. (Set SWITCHBOARD_TEST_PG_URL / SWITCHBOARD_TEST_REDIS_URL to use
# servers elsewhere: nothing is started then.)
set -u

wait_for() {  # wait_for <what> <command...>: up to 20 s
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$what did not come up" >&2
  return 1
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }

if [ -z "${SWITCHBOARD_TEST_PG_URL:-}" ]; then
  if ! command -v pg_isready >/dev/null || ! command -v pg_ctlcluster >/dev/null; then
    echo "PostgreSQL is not installed: apt-get install postgresql (or run \`make test-quick\`)" >&2
    exit 1
  fi
  if ! pg_up; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    echo "starting PostgreSQL $version" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || exit 1
    wait_for PostgreSQL pg_up || exit 1
  fi
fi

if [ -z "${SWITCHBOARD_TEST_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "Redis is not installed: apt-get install redis-server (or run \`make test-quick\`)" >&2
    exit 1
  fi
  if ! redis_up; then
    echo "starting Redis" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile /tmp/switchboard-test-redis.log || exit 1
    wait_for Redis redis_up || exit 1
  fi
fi
