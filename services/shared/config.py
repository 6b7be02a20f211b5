"""Loading config modules. A config module (MineStudio's format) defines env_generator(), policy_generator()
and online_dict; `load` imports one by built-in name, dotted path or file path, checks online_dict against
the typed schema (schema.py, the reference's defaults), applies dot-list overrides and resolves
interpolations, and gives an OnlineConfig: the one typed config every part of mso uses. A session record
stores it as resolved YAML (to_yaml), which a node parses once (from_yaml). Also here: which modules a node
may run (the allow-list) and running exactly the bytes a session names (import_verified)."""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from services.shared.schema import OnlineConfig

BUILTIN_PACKAGE = "configs"
CONFIG_PATH_ENV = "MSO_CONFIG_PATH"  # extra folders searched for config modules (os.pathsep separated)
MODULES_ENV = "MSO_CONFIG_MODULES"   # dotted module prefixes a remote Launch may name (comma separated)
LOAD_TIMEOUT = 300.0  # seconds a launch waits for a config module to load in its child (LaunchLoad)


class ConfigError(ValueError):
    """A config module or key that cannot be used; the message names it and what was expected."""


class SourceMismatch(ConfigError):
    """This node's copy of a config module is not the one a session was launched with."""


@dataclass(frozen=True)
class ConfigSource:
    """A session's config module as every process of a node loads it: its name and the SHA-256 of the bytes
    it was launched with (from the session record)."""
    name: str
    sha256: str

    def verify(self) -> None:
        """Check what load() checks (the allow-list, the bytes) without running the module: a service that
        only starts the actors which run it need not pay for its imports (torch, the env stack)."""
        _verified_bytes(self.name, self.sha256)

    def load(self) -> ModuleType:
        return import_verified(self.name, self.sha256)


@dataclass
class LoadedConfig:
    name: str             # how it was asked for: built-in name, dotted path or file path
    module: ModuleType | None  # None when this process did not run it (LaunchLoad)
    source: str           # the module's source text (stored with the session and every checkpoint)
    source_hash: str      # SHA-256 of the module file's bytes: what every node verifies before executing it
    cfg: OnlineConfig     # online_dict, validated, with overrides applied and interpolations resolved

    @property
    def env_generator(self):
        return self.module.env_generator

    @property
    def policy_generator(self):
        return self.module.policy_generator

    def to_yaml(self) -> str:
        return to_yaml(self.cfg)


def _config_folders() -> list[Path]:
    return [Path(f).resolve() for f in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if f]


def _exec_file(path: Path) -> ModuleType:
    mod_name = "mso_config_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None:
        raise ConfigError(f"config file {path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _find(name: str) -> ModuleType | None:
    """The module `name` denotes, or None; errors inside an existing module propagate."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        return _exec_file(path)
    for folder in _config_folders():
        candidate = folder / f"{name}.py"
        if candidate.is_file():
            return _exec_file(candidate)
    for candidate in (f"{BUILTIN_PACKAGE}.{name}", name):
        try:
            return importlib.import_module(candidate)
        except ModuleNotFoundError as exc:
            if exc.name is None or not candidate.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
    return None


def import_module(name: str) -> ModuleType:
    """A config module by built-in name (configs/NAME.py), name in an MSO_CONFIG_PATH folder, dotted module
    path, or .py file path. Any failure is a ConfigError that names the module and the cause."""
    try:
        module = _find(name)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"config module {name} needs {exc.name!r}, which is not installed here") from None
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot import config module {name!r}: {exc}") from None
    except Exception as exc:  # the module's own top-level code failed (SyntaxError included)
        raise ConfigError(f"config module {name} failed while loading: {type(exc).__name__}: {exc}") from None
    if module is None:
        raise ConfigError(f"no config named {name!r}: not a built-in ({', '.join(builtin_names())}), "
                          f"not in {CONFIG_PATH_ENV}, not an importable module, not a .py file")
    return module


def _locate(name: str) -> tuple[str, Path, importlib.machinery.ModuleSpec | None]:
    """(module name, source file, spec) of the module `name` denotes, found without executing it (a dotted
    path's parent packages are imported, as Python must to find it); ConfigError when there is none."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        return "mso_config_" + hashlib.sha1(str(path).encode()).hexdigest()[:12], path, None
    for folder in _config_folders():
        path = folder / f"{name}.py"
        if path.is_file():
            return "mso_config_" + hashlib.sha1(str(path).encode()).hexdigest()[:12], path, None
    for candidate in (f"{BUILTIN_PACKAGE}.{name}", name):
        try:
            spec = importlib.util.find_spec(candidate)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            return candidate, Path(spec.origin), spec
    raise ConfigError(f"no config named {name!r} here: not a built-in, not in {CONFIG_PATH_ENV}, not an "
                      f"importable .py module")


def _verified_bytes(name: str, source_hash: str) -> tuple[str, Path, importlib.machinery.ModuleSpec | None, bytes]:
    """(module name, file, spec, bytes) of config `name` once it passed the allow-list and its bytes hash to
    source_hash; ConfigError (SourceMismatch for other bytes) otherwise. Nothing of it is executed."""
    check_remote_name(name)
    module_name, path, spec = _locate(name)
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != source_hash:
        raise SourceMismatch(f"config module {name} at {path} differs from the one the session was launched "
                             f"with; deploy the same file on every node")
    return module_name, path, spec, source


def import_verified(name: str, source_hash: str) -> ModuleType:
    """The config module a session names, as a node joining it runs it: `name` comes from Redis, so it must
    pass the same allow-list as a remote Launch, and the bytes executed are exactly the bytes whose SHA-256
    is source_hash (read once, hashed, then executed), never the file read again. SourceMismatch when this
    node's copy differs; ConfigError for any other reason, naming it."""
    module_name, path, spec, source = _verified_bytes(name, source_hash)
    known = sys.modules.get(module_name)
    if known is not None and getattr(known, "__mso_source_hash__", None) == source_hash:
        return known
    module = importlib.util.module_from_spec(spec) if spec is not None else ModuleType(module_name)
    module.__file__ = str(path)
    module.__mso_source_hash__ = source_hash
    sys.modules[module_name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as exc:  # the module's own top-level code failed (SyntaxError included)
        del sys.modules[module_name]
        if isinstance(exc, ModuleNotFoundError):
            raise ConfigError(f"config module {name} needs {exc.name!r}, which is not installed here") from None
        raise ConfigError(f"config module {name} failed while loading: {type(exc).__name__}: {exc}") from None
    return module


def check_remote_name(name: str) -> None:
    """What a remote caller (LauncherService/Launch) may name: a built-in, a module in an MSO_CONFIG_PATH
    folder, or a dotted path under a prefix in MSO_CONFIG_MODULES. Any other file or module would let a
    network client execute arbitrary code on the launcher's host."""
    if not name or len(name) > 256:
        raise ConfigError("config name must be 1 to 256 characters")
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser().resolve()
        if not any(path.is_relative_to(folder) for folder in _config_folders()):
            raise ConfigError(f"config file {name} is outside the folders in {CONFIG_PATH_ENV}; a remote "
                              f"launch may only name built-ins, {CONFIG_PATH_ENV} modules or {MODULES_ENV} modules")
        return
    if name in builtin_names() or any((folder / f"{name}.py").is_file() for folder in _config_folders()):
        return
    prefixes = [p for p in os.environ.get(MODULES_ENV, "").split(",") if p]
    if not any(name == p or name.startswith(p + ".") for p in prefixes):
        raise ConfigError(f"config {name!r} is not a built-in ({', '.join(builtin_names())}), not in "
                          f"{CONFIG_PATH_ENV}, and not under a module prefix allowed by {MODULES_ENV}")


def builtin_names() -> list[str]:
    folder = Path(importlib.import_module(BUILTIN_PACKAGE).__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _closest(cfg: DictConfig, full_key: str) -> str:
    parent_path, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    options = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, options, n=1)
    prefix = f"{parent_path}." if parent_path else ""
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys there: {', '.join(options)}"


def validate(online_dict: Any, overrides: list[str] = ()) -> OnlineConfig:
    """online_dict with the overrides applied, checked against the schema and resolved, or ConfigError
    naming the first thing wrong."""
    schema = OmegaConf.structured(OnlineConfig)
    OmegaConf.set_struct(schema, True)
    if isinstance(online_dict, DictConfig):
        online_dict = OmegaConf.to_container(online_dict, resolve=True)
    if not isinstance(online_dict, dict):
        raise ConfigError(f"online_dict must be a dict, got {type(online_dict).__name__}")
    for source, layer in [("online_dict", online_dict), *[(f"override {o!r}", o) for o in overrides]]:
        try:
            if isinstance(layer, str):
                if "=" not in layer:
                    raise ConfigError(f"override {layer!r} is not KEY=VALUE")
                layer = OmegaConf.from_dotlist([layer])
            schema = OmegaConf.merge(schema, layer)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            key = exc.full_key or str(exc.key)
            raise ConfigError(f"{source}: unknown key {key}{_closest(schema, key)}") from None
        except OmegaConfBaseException as exc:
            what = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
            raise ConfigError(f"{source}: {getattr(exc, 'full_key', None) or 'value'}: {what}") from None
    try:
        cfg = OmegaConf.to_object(schema)  # interpolations resolved here, once, by whoever loads the module
    except OmegaConfBaseException as exc:
        what = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
        raise ConfigError(f"{getattr(exc, 'full_key', None) or 'value'}: {what}") from None
    check(cfg)
    return cfg


def check(cfg: OnlineConfig) -> None:
    """Impossible combinations of otherwise well-typed values."""
    r, w, t = cfg.rollout_config, cfg.rollout_config.worker_config, cfg.train_config
    positive = {"rollout_config.num_rollout_workers": r.num_rollout_workers,
                "rollout_config.fragment_length": r.fragment_length,
                "rollout_config.worker_config.num_envs": w.num_envs,
                "rollout_config.worker_config.batch_size": w.batch_size,
                "train_config.num_workers": t.num_workers,
                "train_config.batch_size_per_gpu": t.batch_size_per_gpu,
                "train_config.batches_per_iteration": t.batches_per_iteration,
                "train_config.gradient_accumulation": t.gradient_accumulation,
                "train_config.context_length": t.context_length,
                "rollout_config.max_pending_fragments": r.max_pending_fragments}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if w.envs_per_process < 0:
        raise ConfigError(f"rollout_config.worker_config.envs_per_process must be 0 (in the worker's thread) or "
                          f"more, got {w.envs_per_process}")
    if t.batches_per_iteration % t.gradient_accumulation:
        raise ConfigError(f"train_config.batches_per_iteration ({t.batches_per_iteration}) must be a multiple "
                          f"of train_config.gradient_accumulation ({t.gradient_accumulation})")
    rb = r.replay_buffer_config
    for key, value in {"replay_buffer_config.max_chunks": rb.max_chunks, "replay_buffer_config.max_reuse":
                       rb.max_reuse, "replay_buffer_config.fragments_per_chunk": rb.fragments_per_chunk}.items():
        if value < 1:
            raise ConfigError(f"rollout_config.{key} must be at least 1, got {value}")
    per_rank = fragments_per_rank(cfg)
    if per_rank > rb.max_chunks * rb.fragments_per_chunk:
        raise ConfigError(f"train_config.batch_size_per_gpu * batches_per_iteration ({per_rank} fragments per rank "
                          f"and iteration) exceeds the replay capacity rollout_config.replay_buffer_config."
                          f"max_chunks * fragments_per_chunk ({rb.max_chunks * rb.fragments_per_chunk})")
    if per_rank > r.max_pending_fragments:
        raise ConfigError(f"rollout_config.max_pending_fragments ({r.max_pending_fragments} per rank) is smaller "
                          f"than the fragments a rank's iteration needs ({per_rank}): producers would block before "
                          f"the trainer could start")
    if cfg.trainer_name != "PPOTrainer":
        raise ConfigError(f"trainer_name {cfg.trainer_name!r} is not a trainer mso has: only PPOTrainer exists")
    if t.stall_timeout < 0:
        raise ConfigError(f"train_config.stall_timeout must be 0 (wait forever) or positive, got {t.stall_timeout}")
    if not 0 <= t.discount <= 1 or not 0 <= t.gae_lambda <= 1:
        raise ConfigError(f"train_config.discount and gae_lambda must lie in [0, 1], got {t.discount}, "
                          f"{t.gae_lambda}")


def fragments_per_rank(cfg: OnlineConfig) -> int:
    """Fragments one trainer rank's iteration trains on: batch_size_per_gpu x batches_per_iteration."""
    return cfg.train_config.batch_size_per_gpu * cfg.train_config.batches_per_iteration


def stream_bound(cfg: OnlineConfig) -> int:
    """Fragments the session's stream holds before producers block: max_pending_fragments per trainer rank (so
    adding ranks does not starve them, and one rank's bound stays the lag its data may have)."""
    return cfg.rollout_config.max_pending_fragments * cfg.train_config.num_workers


def load(name: str, overrides: list[str] = ()) -> LoadedConfig:
    module = import_module(name)
    for attr in ("env_generator", "policy_generator", "online_dict"):
        if not hasattr(module, attr):
            raise ConfigError(f"config module {name} defines no {attr} (a config module needs env_generator, "
                              f"policy_generator and online_dict)")
    return _loaded(name, module, Path(module.__file__).read_bytes(), validate(module.online_dict, overrides))


def _loaded(name: str, module: ModuleType | None, raw: bytes, cfg: OnlineConfig) -> LoadedConfig:
    """A LoadedConfig whose source and SHA-256 are those of the module file's bytes `raw`."""
    return LoadedConfig(name=name, module=module, source=raw.decode("utf-8", errors="replace"),
                        source_hash=hashlib.sha256(raw).hexdigest(), cfg=cfg)


def literal_online_dict(raw: bytes) -> dict | None:
    """A config module's online_dict read from its source without running it, or None unless that is sure to
    be what running it gives: online_dict is one top-level assignment of a literal (ast.literal_eval) and the
    name appears nowhere else in the module, not even as a string (globals()["online_dict"], setattr) or an
    attribute; env_generator and policy_generator are bound at top level; there is no star import; and the
    package of every top-level import is installed (the usual way a module fails to load)."""
    try:
        tree = ast.parse(raw)
    except (SyntaxError, ValueError):
        return None
    mentions = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return None
        for _field, v in ast.iter_fields(node):
            mentions += sum(x == "online_dict" for x in (v if isinstance(v, list) else [v]) if isinstance(x, str))
    value, bound = None, set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
            if [getattr(t, "id", None) for t in node.targets] == ["online_dict"]:
                value = node.value
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            if isinstance(node, ast.Import):
                packages = [a.name for a in node.names]
            else:
                packages = [node.module] if node.level == 0 and node.module else []
            for package in packages:
                try:
                    if importlib.util.find_spec(package.split(".")[0]) is None:
                        return None
                except (ImportError, ValueError):
                    return None
    if mentions != 1 or value is None or not {"env_generator", "policy_generator"} <= bound:
        return None
    try:
        online_dict = ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return online_dict if isinstance(online_dict, dict) else None


class LaunchLoad:
    """load() for a launch (`mso run`, LauncherService/Launch): the launcher never runs a config module in its own
    process, so it does not hold what the module imports for as long as it lives (torch and the env stack,
    ~150 MB that only the actors use), and a module that exits, crashes or hangs while loading takes only a
    child with it (LOAD_TIMEOUT). A module whose online_dict is a literal
    (literal_online_dict: the built-ins' and most MineStudio-style modules') is read without running it: the
    actors run it anyway, and one that fails to import there fails the session with the module's own error.
    Any other module runs in a child interpreter (`mso config`) that starts at construction, while `mso run`
    starts its Ray head and services. That child costs 1.6-1.9 CPU-s of the ~12.5 spent on 2 cores before
    the first update (it imports torch), which is why a literal is not run. result() gives the same checks,
    errors and resolved config as load(); `module` is None."""

    def __init__(self, name: str, overrides: list[str] = ()):
        self.name, self.overrides = name, list(overrides)
        self.child, self.literal = None, None
        try:
            self.path: Path | None = _locate(name)[1]
            self.before: bytes | None = self.path.read_bytes()
        except ConfigError:  # the child says why, as load() would
            self.path = self.before = None
        if self.before is not None:
            self.literal = literal_online_dict(self.before)
        if self.literal is None:
            self.child = subprocess.Popen([sys.executable, "-m", "services.cli", "config", name, *overrides],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          text=True)

    def result(self) -> LoadedConfig:
        if self.child is None:
            return _loaded(self.name, None, self.before, validate(self.literal, self.overrides))
        try:
            out, said = self.child.communicate(timeout=LOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise ConfigError(f"config module {self.name}: loading it took longer than {LOAD_TIMEOUT:.0f} s") from None
        said = said.strip()
        if self.child.returncode != 0:
            if self.child.returncode == 2 and said.startswith("error: "):
                raise ConfigError(said.removeprefix("error: "))
            raise ConfigError(f"config module {self.name}: loading it exited with code {self.child.returncode}: "
                              f"{said[-2000:]}")
        if self.path is None:
            raise ConfigError(f"config module {self.name} loaded, but its source file cannot be found from here")
        if self.path.read_bytes() != self.before:
            raise ConfigError(f"config module {self.name} at {self.path} changed while it was loading; run again")
        return _loaded(self.name, None, self.before, from_yaml(out))

    def cancel(self) -> None:
        """Stop the child if it still runs (the command ends before it needed the result)."""
        if self.child is not None:
            if self.child.poll() is None:
                self.child.kill()
            self.child.communicate()


def to_yaml(cfg: OnlineConfig) -> str:
    """The config as a session record stores it (resolved: validate resolved every interpolation)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> OnlineConfig:
    """A session's config as stored in its record: resolved YAML. An interpolation left in it (`${...}`)
    would be resolved on each node that reads it (`${oc.env:...}` reads that node's environment), so it is
    refused: the launcher stores configs resolved."""
    try:
        tree = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"unreadable session config: {exc}") from None
    path = _interpolation(tree, "")
    if path is not None:
        raise ConfigError(f"session config holds an interpolation at {path}; configs are stored resolved")
    return validate(tree)


def _interpolation(tree, path: str) -> str | None:
    """The path of the first string holding `${` in a plain tree, or None."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            found = _interpolation(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found = _interpolation(v, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(tree, str) and "${" in tree:
        return path or "the top"
    return None


def check_remote_overrides(overrides: list[str]) -> None:
    """What a remote caller (LauncherService/Launch) may override: plain values. An interpolation would be
    resolved by the launcher with its own environment (`${oc.env:REDIS_URL}` reads the Redis password)."""
    for o in overrides:
        if "${" in o:
            raise ConfigError(f"override {o[:80]!r}: interpolations (${{...}}) are not accepted from a remote "
                              f"caller; give the value itself")


def allow_locally(name: str) -> None:
    """Let the services this process starts run config `name` (`mso run NAME`: the user named it on their
    own machine), by adding it to the allow-list they inherit: its folder to MSO_CONFIG_PATH for a file, the
    module to MSO_CONFIG_MODULES for a dotted path."""
    try:
        check_remote_name(name)
        return
    except ConfigError:
        pass
    if name.endswith(".py") or os.sep in name:
        var, value = CONFIG_PATH_ENV, str(Path(name).expanduser().resolve().parent)
        os.environ[var] = os.pathsep.join(filter(None, [os.environ.get(var), value]))
    else:
        os.environ[MODULES_ENV] = ",".join(filter(None, [os.environ.get(MODULES_ENV), name]))
