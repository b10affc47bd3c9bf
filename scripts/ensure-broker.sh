#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start the local one if nothing listens,
# then wait until the port answers. Exits non-zero, saying why, if there is no broker to start.
set -u
port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    # The tests' broker fixture starts rabbitmq:3-management through the Docker SDK.
    echo "ensure-broker: no local RabbitMQ; the tests will start one in Docker" >&2
    exit 0
  fi
  echo "ensure-broker: nothing listens on 127.0.0.1:5672, rabbitmq-server is not installed" \
       "(apt-get install rabbitmq-server) and no Docker engine answers" >&2
  exit 1
fi
echo "ensure-broker: starting RabbitMQ (rabbitmq-server -detached)" >&2
rabbitmq-server -detached || true
for _ in $(seq 1 90); do
  if port_open; then
    echo "ensure-broker: RabbitMQ answers on 127.0.0.1:5672" >&2
    exit 0
  fi
  sleep 1
done
echo "ensure-broker: RabbitMQ did not answer on 127.0.0.1:5672 within 90 s" >&2
exit 1
