"""The session record: a node joins with the launcher's resolved config, and refuses a differing module."""

import pytest

from mso import keys, session
from mso.config import load


def test_a_node_joins_with_the_resolved_config(redis_client):
    sid = session.create(redis_client, load("cartpole", ["train_config.learning_rate=0.5"]))
    record, cfg = session.join(redis_client, sid)
    assert record["config_name"] == "cartpole" and cfg.train_config.learning_rate == 0.5
    assert "online_dict" in record["source"]


def test_a_node_whose_config_module_differs_refuses_to_join_naming_the_file(redis_client):
    sid = session.create(redis_client, load("cartpole"))
    redis_client.hset(keys.SessionKeys(sid).record, "source_hash", "0" * 64)  # launched from another source
    with pytest.raises(session.SessionError, match=r"config module cartpole at .*cartpole\.py differs"):
        session.join(redis_client, sid)


def test_an_unknown_session_is_named(redis_client):
    with pytest.raises(session.SessionError, match="no session 'abc'"):
        session.join(redis_client, "abc")
