"""Shared fixtures: real servers started per test session (NATS, S3) or fresh per-run namespaces
on the machine's RabbitMQ and PostgreSQL."""

pytest_plugins = [
    "tests.fixtures.brokers",
    "tests.fixtures.s3",
    "tests.fixtures.database",
    "tests.fixtures.stack",
    "tests.fixtures.browser",
]
