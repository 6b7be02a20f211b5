"""Config modules load by name with overrides; bad keys and values fail naming the key."""

import pytest

from services.shared.config import ConfigError, load, stream_bound


def test_builtin_with_overrides():
    c = load("cartpole", ["train_config.learning_rate=3e-4", "rollout_config.worker_config.num_envs=3"])
    assert c.cfg.train_config.learning_rate == 3e-4
    assert c.cfg.rollout_config.worker_config.num_envs == 3
    assert c.cfg.train_config.use_amp is False  # a key the module leaves out gets the schema default
    assert len(c.source_hash) == 64


def test_file_path_loads(tmp_path):
    src = (load("cartpole").module.__file__)
    copy = tmp_path / "mine.py"
    copy.write_text(open(src).read())
    assert load(str(copy)).cfg.rollout_config.fragment_length == 16


@pytest.mark.parametrize("override, message", [
    ("train_config.learning_rat=1", "unknown key train_config.learning_rat; did you mean train_config.learning_rate"),
    ("rollout_config.worker_config.num_env=2", "did you mean rollout_config.worker_config.num_envs"),
    ("train_config.learning_rate=fast", "train_config.learning_rate"),
    ("train_config.gradient_accumulation=3", "multiple of train_config.gradient_accumulation"),
    ("rollout_config.fragment_length=0", "fragment_length must be at least 1"),
    ("no_equals_sign", "is not KEY=VALUE"),
    ("rollout_config.max_pending_fragments=15", "max_pending_fragments (15 per rank) is smaller than the fragments "
                                                "a rank's iteration needs (16)"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load("cartpole", [override])


def test_unknown_config_lists_builtins():
    with pytest.raises(ConfigError, match="cartpole"):
        load("no_such_config")


def test_a_module_with_the_reference_key_set_loads_unchanged():
    from pathlib import Path

    path = Path(__file__).parents[1] / "launcher" / "reference_keys_config.py"
    cfg = load(str(path)).cfg
    assert cfg.train_config.use_amp is False and cfg.train_config.kl_divergence_coef_rho == 0.2
    assert cfg.rollout_config.replay_buffer_config.database_config.num_shards == 8


def test_the_stream_holds_max_pending_fragments_per_trainer_rank():
    """Adding ranks must not leave them starved by a bound sized for one (cartpole's is an iteration and a half)."""
    one = load("cartpole").cfg
    two = load("cartpole", ["train_config.num_workers=2"]).cfg
    assert stream_bound(one) == one.rollout_config.max_pending_fragments == 24
    assert stream_bound(two) == 48


def test_dotted_module_path_loads():
    assert load("configs.cartpole").cfg.rollout_config.fragment_length == 16


def test_config_command_prints_yaml_or_the_error():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "services.cli", "config", "cartpole",
                         "train_config.learning_rate=0.5"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "learning_rate: 0.5" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "services.cli", "config", "cartpole", "train_config.lr=1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key train_config.lr" in bad.stderr


@pytest.mark.parametrize("name", ["cartpole", "crafter"])
def test_a_literal_online_dict_read_without_running_the_module_resolves_as_running_it(name):
    """`mso run` reads such a module's online_dict from its source (LaunchLoad): the config it launches with
    must be the one running the module gives, overrides included."""
    from pathlib import Path

    from services.shared.config import literal_online_dict, validate

    loaded = load(name, ["seed=7", "train_config.learning_rate=1e-3"])
    literal = literal_online_dict(Path(loaded.module.__file__).read_bytes())
    assert literal is not None
    assert validate(literal, ["seed=7", "train_config.learning_rate=1e-3"]) == loaded.cfg


LITERAL = '''
import os

def env_generator():
    return None

def policy_generator():
    return None

online_dict = {"seed": 3, "train_config": {"learning_rate": 1e-3}}
'''


@pytest.mark.parametrize("change", [
    "online_dict['seed'] = 4",                          # changed after it is assigned
    "globals()['online_dict'] = {'seed': 5}",            # reassigned by its name as a string
    "import sys\nsetattr(sys.modules[__name__], 'online_dict', {})",
    "def f():\n    global online_dict",
    "from os.path import *",                            # a star import may rebind it
    "import no_such_package_anywhere_xyz",              # the module cannot load: its child says so
])
def test_a_module_that_could_change_its_online_dict_is_run_not_read(change):
    from services.shared.config import literal_online_dict

    assert literal_online_dict(LITERAL.encode()) == {"seed": 3, "train_config": {"learning_rate": 1e-3}}
    assert literal_online_dict((LITERAL + change + "\n").encode()) is None


@pytest.mark.parametrize("source", [
    LITERAL.replace('"seed": 3', '"seed": SEED'),        # not a literal
    LITERAL.replace("def policy_generator", "def other_generator"),
    LITERAL.replace('online_dict = {"seed": 3,', 'online_dict = dict(seed=3, **{').replace("1e-3}}", "1e-3}})"),
    "online_dict = [1, 2]\ndef env_generator(): pass\ndef policy_generator(): pass\n",
    "this is not python",
])
def test_a_module_whose_online_dict_is_not_a_plain_literal_is_run_not_read(source):
    from services.shared.config import literal_online_dict

    assert literal_online_dict(source.encode()) is None


def test_gate_kl_is_run_not_read():
    """MineStudio's module builds its online_dict from names, so `mso run` runs it in a child."""
    from pathlib import Path

    from services.shared.config import literal_online_dict

    assert literal_online_dict(Path(load("gate_kl").module.__file__).read_bytes()) is None


def test_a_module_that_hangs_while_loading_fails_the_launch_after_the_limit_and_its_child_is_gone(tmp_path,
                                                                                                 monkeypatch):
    import time

    from services.shared import config

    module = tmp_path / "hangs.py"
    module.write_text("import time\ntime.sleep(3600)\n")
    monkeypatch.setattr(config, "LOAD_TIMEOUT", 3.0)
    loading = config.LaunchLoad(str(module))
    started = time.monotonic()
    with pytest.raises(ConfigError, match="loading it took longer than 3 s"):
        loading.result()
    assert time.monotonic() - started < 10
    assert loading.child.poll() is not None  # killed, not left behind
