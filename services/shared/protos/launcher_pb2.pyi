from services.shared.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_PHASE_UNSPECIFIED: _ClassVar[SessionPhase]
    SESSION_PHASE_STARTING_ROLLOUTS: _ClassVar[SessionPhase]
    SESSION_PHASE_STARTING_TRAINER: _ClassVar[SessionPhase]
    SESSION_PHASE_RUNNING: _ClassVar[SessionPhase]
    SESSION_PHASE_STOPPING: _ClassVar[SessionPhase]
    SESSION_PHASE_FINISHED: _ClassVar[SessionPhase]
    SESSION_PHASE_FAILED: _ClassVar[SessionPhase]
    SESSION_PHASE_STOPPED: _ClassVar[SessionPhase]
SESSION_PHASE_UNSPECIFIED: SessionPhase
SESSION_PHASE_STARTING_ROLLOUTS: SessionPhase
SESSION_PHASE_STARTING_TRAINER: SessionPhase
SESSION_PHASE_RUNNING: SessionPhase
SESSION_PHASE_STOPPING: SessionPhase
SESSION_PHASE_FINISHED: SessionPhase
SESSION_PHASE_FAILED: SessionPhase
SESSION_PHASE_STOPPED: SessionPhase

class LaunchRequest(_message.Message):
    __slots__ = ("config", "overrides")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    config: str
    overrides: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, config: _Optional[str] = ..., overrides: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StopSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_common_pb2.Node, _Mapping]]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "num_iterations", "env_steps", "env_steps_per_second", "mean_return", "episodes", "model_version", "policy_lag", "queue_depth", "restarts", "ledger", "scored_episodes", "success_rates", "score")
    class SuccessRatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    SCORED_EPISODES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    num_iterations: int
    env_steps: int
    env_steps_per_second: float
    mean_return: float
    episodes: int
    model_version: int
    policy_lag: float
    queue_depth: int
    restarts: int
    ledger: Ledger
    scored_episodes: int
    success_rates: _containers.ScalarMap[str, float]
    score: float
    def __init__(self, iteration: _Optional[int] = ..., num_iterations: _Optional[int] = ..., env_steps: _Optional[int] = ..., env_steps_per_second: _Optional[float] = ..., mean_return: _Optional[float] = ..., episodes: _Optional[int] = ..., model_version: _Optional[int] = ..., policy_lag: _Optional[float] = ..., queue_depth: _Optional[int] = ..., restarts: _Optional[int] = ..., ledger: _Optional[_Union[Ledger, _Mapping]] = ..., scored_episodes: _Optional[int] = ..., success_rates: _Optional[_Mapping[str, float]] = ..., score: _Optional[float] = ...) -> None: ...

class Ledger(_message.Message):
    __slots__ = ("produced", "consumed", "dropped_stale", "dropped_corrupt", "pending", "reused", "produced_by_node")
    class ProducedByNodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PRODUCED_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_BY_NODE_FIELD_NUMBER: _ClassVar[int]
    produced: int
    consumed: int
    dropped_stale: int
    dropped_corrupt: int
    pending: int
    reused: int
    produced_by_node: _containers.ScalarMap[str, int]
    def __init__(self, produced: _Optional[int] = ..., consumed: _Optional[int] = ..., dropped_stale: _Optional[int] = ..., dropped_corrupt: _Optional[int] = ..., pending: _Optional[int] = ..., reused: _Optional[int] = ..., produced_by_node: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "config_name", "config_yaml", "phase", "nodes", "progress", "error", "faults")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config_name: str
    config_yaml: str
    phase: SessionPhase
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Node]
    progress: Progress
    error: str
    faults: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., config_name: _Optional[str] = ..., config_yaml: _Optional[str] = ..., phase: _Optional[_Union[SessionPhase, str]] = ..., nodes: _Optional[_Iterable[_Union[_common_pb2.Node, _Mapping]]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[str] = ..., faults: _Optional[_Iterable[str]] = ...) -> None: ...
