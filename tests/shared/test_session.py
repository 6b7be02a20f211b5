"""The session record: a node joins with the launcher's resolved config, and runs a config module only when
its name passes the allow-list and its bytes are the ones the session was launched with."""

from pathlib import Path

import pytest

from services.shared import keys, session
from services.shared.config import ConfigError, SourceMismatch, from_yaml, load


def test_a_node_joins_with_the_resolved_config(redis_client):
    sid = session.create(redis_client, load("cartpole", ["train_config.learning_rate=0.5"]))
    joined = session.join(redis_client, sid)
    record = session.read(redis_client, sid)
    assert record.config_name == "cartpole" and joined.cfg.train_config.learning_rate == 0.5
    assert "online_dict" in joined.source_text and joined.source.sha256 == record.source_hash
    assert record.phase == "SESSION_PHASE_STARTING_ROLLOUTS"  # a phase the protos know


def test_a_node_whose_config_module_differs_refuses_to_join_naming_the_file(redis_client):
    sid = session.create(redis_client, load("cartpole"))
    redis_client.hset(keys.SessionKeys(sid).record, "source_hash", "0" * 64)  # launched from another source
    with pytest.raises(SourceMismatch, match=r"config module cartpole at .*cartpole\.py differs"):
        session.join(redis_client, sid)


def evil_module(folder, marker):
    path = folder / "evil.py"
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return path


@pytest.mark.parametrize("name", ["evil", "{path}", "os"])
def test_a_config_name_from_redis_outside_the_allow_list_is_never_executed(redis_client, tmp_path, name):
    # Whoever can write Redis could name any module or file; a node runs only what an operator allowed, and
    # refuses before importing anything.
    marker = tmp_path / "ran"
    path = evil_module(tmp_path, marker)
    sid = session.create(redis_client, load("cartpole"))
    redis_client.hset(keys.SessionKeys(sid).record, "config_name", name.format(path=path))
    with pytest.raises(ConfigError, match="MSO_CONFIG|outside"):
        session.join(redis_client, sid)
    assert not marker.exists()


def test_an_allowed_module_runs_only_with_the_bytes_the_session_names(redis_client, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    path = evil_module(tmp_path, marker)
    monkeypatch.setenv("MSO_CONFIG_PATH", str(tmp_path))
    sid = session.create(redis_client, load("cartpole"))
    redis_client.hset(keys.SessionKeys(sid).record, "config_name", str(path))
    with pytest.raises(SourceMismatch):  # allowed by its folder, but not the source the session was launched with
        session.join(redis_client, sid)
    assert not marker.exists()


def test_joining_verifies_the_module_without_running_it(redis_client, tmp_path, monkeypatch):
    """A service only starts the actors that run the module: it checks the allow-list and the bytes, and pays
    for none of the module's imports (torch and the env stack: seconds of every Start on 2 cores)."""
    marker = tmp_path / "ran"
    path = tmp_path / "mine.py"
    path.write_text(Path(load("cartpole").module.__file__).read_text()
                    + f"\nopen({str(marker)!r}, 'a').write('ran')\n")
    monkeypatch.setenv("MSO_CONFIG_PATH", str(tmp_path))
    sid = session.create(redis_client, load(str(path)))  # the launcher runs it
    marker.unlink()
    joined = session.join(redis_client, sid)
    assert not marker.exists()
    joined.source.load()  # as the node's actors do
    assert marker.read_text() == "ran"


def test_a_session_config_with_an_interpolation_is_refused():
    # Stored configs are resolved by the launcher; one that still holds ${oc.env:...} would read each node's
    # environment (the Redis password among it) into values that others see.
    text = load("cartpole").to_yaml().replace("output/videos/cartpole", "${oc.env:HOME}")
    with pytest.raises(ConfigError, match="interpolation at rollout_config.worker_config.video_output_dir"):
        from_yaml(text)


def test_the_stored_config_is_resolved_by_the_launcher(monkeypatch):
    monkeypatch.setenv("MSO_TEST_DIR", "/data/videos")
    loaded = load("cartpole", ["rollout_config.worker_config.video_output_dir=${oc.env:MSO_TEST_DIR}"])
    assert "${" not in loaded.to_yaml()
    assert from_yaml(loaded.to_yaml()).rollout_config.worker_config.video_output_dir == "/data/videos"


def test_an_unknown_session_is_named(redis_client):
    with pytest.raises(session.SessionError, match="no session 'abc'"):
        session.join(redis_client, "abc")


def test_a_malformed_heartbeat_is_skipped_not_fatal(redis_client):
    session.Heartbeat(redis_client, "good-node", "rollout", lambda: "127.0.0.1:1", lambda: ("SERVICE_STATE_IDLE", "", "")).beat()
    for node_id, raw in (("garbage", b"\xc1\xc1"), ("list", b"\x91\x01"), ("wrong", b"\x81\xa4kind\x01")):
        redis_client.set(keys.node(node_id), raw)
        redis_client.sadd(keys.NODES, node_id)
    assert [n.node_id for n in session.list_nodes(redis_client)] == ["good-node"]
