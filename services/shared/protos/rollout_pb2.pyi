from services.shared.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutStartRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class RolloutStopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("num_workers",)
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    num_workers: int
    def __init__(self, num_workers: _Optional[int] = ...) -> None: ...

class WatchEpisodesRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Episode(_message.Message):
    __slots__ = ("episode_id", "episode_return", "length", "model_version", "discounted_return", "slot", "task", "truncated", "video")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_RETURN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISCOUNTED_RETURN_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    episode_return: float
    length: int
    model_version: int
    discounted_return: float
    slot: str
    task: str
    truncated: bool
    video: str
    def __init__(self, episode_id: _Optional[str] = ..., episode_return: _Optional[float] = ..., length: _Optional[int] = ..., model_version: _Optional[int] = ..., discounted_return: _Optional[float] = ..., slot: _Optional[str] = ..., task: _Optional[str] = ..., truncated: _Optional[bool] = ..., video: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("node_id", "session_id", "state", "workers", "live_envs", "env_steps", "env_steps_per_second", "fragments_pushed", "model_version", "env_restarts", "last_error", "bytes_pushed", "episodes", "env_timeouts", "steps_dropped", "inference_ms", "videos", "worker_restarts", "worker_status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ENVS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENV_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    ENV_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    WORKER_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    state: _common_pb2.ServiceState
    workers: int
    live_envs: int
    env_steps: int
    env_steps_per_second: float
    fragments_pushed: int
    model_version: int
    env_restarts: int
    last_error: str
    bytes_pushed: int
    episodes: int
    env_timeouts: int
    steps_dropped: int
    inference_ms: float
    videos: int
    worker_restarts: int
    worker_status: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ServiceState, str]] = ..., workers: _Optional[int] = ..., live_envs: _Optional[int] = ..., env_steps: _Optional[int] = ..., env_steps_per_second: _Optional[float] = ..., fragments_pushed: _Optional[int] = ..., model_version: _Optional[int] = ..., env_restarts: _Optional[int] = ..., last_error: _Optional[str] = ..., bytes_pushed: _Optional[int] = ..., episodes: _Optional[int] = ..., env_timeouts: _Optional[int] = ..., steps_dropped: _Optional[int] = ..., inference_ms: _Optional[float] = ..., videos: _Optional[int] = ..., worker_restarts: _Optional[int] = ..., worker_status: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("index", "state", "env_steps", "live_envs", "restarts", "last_error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ENVS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: str
    env_steps: int
    live_envs: int
    restarts: int
    last_error: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[str] = ..., env_steps: _Optional[int] = ..., live_envs: _Optional[int] = ..., restarts: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...
