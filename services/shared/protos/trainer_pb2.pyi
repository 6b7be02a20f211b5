from services.shared.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainerStartRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TrainerStopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("node_id", "session_id", "state", "iteration", "num_iterations", "model_version", "samples_per_second", "losses", "approx_kl", "policy_lag", "fragments_consumed", "fragments_dropped", "last_error", "replay_fragments", "replay_capacity", "fragments_reused", "metrics", "mean_return", "mean_episode_length", "episodes", "score")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    APPROX_KL_FIELD_NUMBER: _ClassVar[int]
    POLICY_LAG_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_REUSED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    MEAN_EPISODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    state: _common_pb2.ServiceState
    iteration: int
    num_iterations: int
    model_version: int
    samples_per_second: float
    losses: _containers.ScalarMap[str, float]
    approx_kl: float
    policy_lag: float
    fragments_consumed: int
    fragments_dropped: int
    last_error: str
    replay_fragments: int
    replay_capacity: int
    fragments_reused: int
    metrics: _containers.ScalarMap[str, float]
    mean_return: float
    mean_episode_length: float
    episodes: int
    score: float
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ServiceState, str]] = ..., iteration: _Optional[int] = ..., num_iterations: _Optional[int] = ..., model_version: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., losses: _Optional[_Mapping[str, float]] = ..., approx_kl: _Optional[float] = ..., policy_lag: _Optional[float] = ..., fragments_consumed: _Optional[int] = ..., fragments_dropped: _Optional[int] = ..., last_error: _Optional[str] = ..., replay_fragments: _Optional[int] = ..., replay_capacity: _Optional[int] = ..., fragments_reused: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., mean_return: _Optional[float] = ..., mean_episode_length: _Optional[float] = ..., episodes: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...
