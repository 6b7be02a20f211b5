"""The config schema: one typed definition of a session's online_dict, with the reference's keys and defaults
and a line of doc per key. A session's config is an OnlineConfig everywhere it is used: config.py loads,
validates and resolves it once per process from a config module or a session record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DatabaseConfig:
    path: str = "output/replay_buffer_cache"  # reference diskcache folder; kept for compatibility, unused
    num_shards: int = 8                       # reference diskcache shards; kept for compatibility, unused


@dataclass
class ReplayBufferConfig:
    max_chunks: int = 4800          # most chunks held for sampling
    max_reuse: int = 2              # a chunk is retired after this many samplings
    max_staleness: int = 2          # accept data when learner version - data version <= this
    fragments_per_report: int = 40  # log replay throughput every N fragments
    fragments_per_chunk: int = 1    # consecutive fragments of one env slot sampled together
    database_config: DatabaseConfig = field(default_factory=DatabaseConfig)


@dataclass
class WorkerConfig:
    num_envs: int = 16                        # env subprocesses per rollout worker
    batch_size: int = 8                       # observations per inference call (or fewer after a short wait)
    restart_interval: Optional[int] = 3600    # seconds before an env is rebuilt; 0 or null disables
    video_fps: int = 20                       # fps of recorded episode videos
    video_output_dir: str = "output/videos"   # where episode videos are written
    moving_stat_duration: int = 300           # reference extra kwarg (seconds of moving statistics)
    log_interval: Optional[int] = None        # reference extra kwarg
    max_fast_reset: int = 10000               # reference extra kwarg (only logged there)
    env_timeout: float = 300.0                # mso: seconds an env may take to answer a step (including its
                                              # automatic reset) before it is killed and rebuilt
    env_start_timeout: float = 600.0          # mso: seconds a new env process may take to send its first obs
    envs_per_process: int = 1                 # mso: envs one env process steps in lockstep: 1 isolates each
                                              # env (MineStudio's layout); more save a pipe round trip per step
                                              # for fast envs, at the cost of a slow env holding its
                                              # process-mates back; 0 steps every env in the worker's own
                                              # thread (no process, no timeout: for microsecond envs)
    videos_per_worker: int = 1                # mso: envs per worker that record their next episode when a
                                              # version divisible by train_config.record_video_interval arrives


@dataclass
class RolloutConfig:
    num_rollout_workers: int = 2            # RolloutWorker actors per rollout node
    num_gpus_per_worker: float = 1.0        # Ray GPUs per worker (0 on a CPU machine)
    num_cpus_per_worker: float = 1          # Ray CPUs per worker
    fragment_length: int = 256              # steps per fragment
    to_send_queue_size: int = 8             # fragments a worker's sender may hold while the stream is full
    worker_config: WorkerConfig = field(default_factory=WorkerConfig)
    replay_buffer_config: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)
    episode_statistics_config: dict = field(default_factory=dict)  # reference: extra EpisodeStatistics kwargs
    max_pending_fragments: int = 1024       # mso: per trainer rank, fragments the stream holds before producers block


@dataclass
class TrainConfig:
    num_workers: int = 2                    # trainer ranks (Ray Train workers, DDP)
    num_gpus_per_worker: float = 1.0        # Ray GPUs per rank (0 on a CPU machine)
    num_iterations: int = 4000              # PPO iterations before the trainer finishes
    vf_warmup: int = 0                      # initial iterations training only the value head (and KL)
    learning_rate: float = 2e-5             # AdamW learning rate
    anneal_lr_linearly: bool = False        # lr_i = (1 - i/num_iterations) * learning_rate
    weight_decay: float = 0.04              # AdamW weight decay
    adam_eps: float = 1e-8                  # AdamW eps
    batch_size_per_gpu: int = 1             # fragments per training batch per rank
    batches_per_iteration: int = 200        # batches per rank per iteration
    gradient_accumulation: int = 10         # batches per optimizer step
    epochs_per_iteration: int = 1           # passes over the iteration's fragments
    context_length: int = 64                # truncated-BPTT window (steps per forward)
    discount: float = 0.999                 # GAE gamma
    gae_lambda: float = 0.95                # GAE lambda
    ppo_clip: float = 0.2                   # ratio clip epsilon (and value clip range)
    clip_vloss: bool = False                # PPO-style value clipping
    max_grad_norm: float = 5.0              # gradient-norm clip per optimizer step
    zero_initial_vf: bool = True            # zero the value head (and its normaliser) at start
    ppo_policy_coef: float = 1.0            # weight of the policy loss
    ppo_vf_coef: float = 0.5                # weight of the value loss
    kl_divergence_coef_rho: float = 0.2     # KL(pi || pi_ref) weight; 0 disables the reference policy
    entropy_bonus_coef: float = 0.0         # weight of -entropy
    coef_rho_decay: float = 0.9995          # rho <- rho * decay after each iteration
    log_ratio_range: float = 50.0           # upper clamp on log(pi/pi_old) before exp (the ratio's overflow guard)
    normalize_advantage_full_batch: bool = True  # normalise advantages over the iteration (all ranks)
    use_normalized_vf: bool = True          # value head predicts in EWMA-normalised space
    num_readers: int = 4                    # reference loader actors per rank; kept for compatibility
    num_cpus_per_reader: float = 0.1        # reference; kept for compatibility
    prefetch_batches: int = 2               # reference; kept for compatibility
    save_interval: int = 10                 # checkpoint every N iterations; 0 disables
    keep_interval: int = 40                 # keep every checkpoint whose iteration is a multiple of this
    record_video_interval: int = 2          # record episode videos every N iterations; 0 disables
    enable_ref_update: bool = False         # reference: ignored by PPOTrainer
    resume: Optional[str] = None            # checkpoint folder to resume from
    resume_optimizer: bool = True           # also restore the optimizer
    save_path: Optional[str] = None         # base folder for checkpoints
    use_amp: bool = False                   # mixed precision: float16 on CUDA, bfloat16 on a CPU with native bf16
    max_approx_kl: float = 10.0             # mso: a batch whose approx KL exceeds this (on any rank) is skipped
    stall_timeout: float = 300.0            # mso: seconds the trainer may wait without a usable fragment before
                                            # the session fails saying why (0: wait forever)


@dataclass
class LoggerConfig:
    project: str = "mso"                    # W&B project (wandb.init(project=...))
    name: str = "run"                       # W&B run name
    wandb: bool = False                     # mso: also log to Weights & Biases; offline unless WANDB_API_KEY is set


@dataclass
class OnlineConfig:
    trainer_name: str = "PPOTrainer"        # only PPOTrainer exists
    detach_rollout_manager: bool = True     # reference: detached manager actor; a rollout node owns its own
    seed: int = 0                           # mso: seeds the policy init, so every node starts from version 0
    rollout_config: RolloutConfig = field(default_factory=RolloutConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    logger_config: LoggerConfig = field(default_factory=LoggerConfig)
