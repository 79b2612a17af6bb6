#!/usr/bin/env bash
# Make sure the servers the test-suite uses from the machine are running: RabbitMQ and PostgreSQL.
# (NATS and the S3 server are started by the tests themselves from wheels.)
# Starts them when installed but stopped, installs them with apt when missing.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do port_open "$port" && return 0; sleep 0.5; done
  echo "ensure-services: $name did not open port $port" >&2
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  echo "ensure-services: starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  # await_startup can return before the port opens: poll the port itself.
  wait_port 5672 RabbitMQ
fi

if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # The tests connect as postgres over 127.0.0.1 without a password, as on the CI machine.
  if ! as_root grep -q "imagebus-test" "$hba"; then
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust # imagebus-test' "$hba"
  fi
  echo "ensure-services: starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 PostgreSQL
fi
echo "ensure-services: RabbitMQ and PostgreSQL are up"
