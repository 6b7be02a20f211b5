"""The learner loop of one trainer rank: read fragments from Redis, re-evaluate them with the current
model, compute GAE, run the PPO epochs, retire the fragments and (rank 0) publish the new model version.

The same function runs as a Ray Train worker (num_workers ranks, torch.distributed with gloo on CPU) and,
for a single rank, inside a plain Ray actor, which starts in seconds rather than Ray Train's 15-20.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from services.shared import keys, session, trainer_status, weights
from services.shared.config import fragments_per_rank
from services.shared.fragment import signature
from services.shared.queue import FragmentConsumer, ledger
from services.shared.redis_server import connect
from services.trainer import checkpoints
from services.trainer import ppo
from services.trainer.optim import AdamW
from services.trainer.lease import holder
from services.trainer.spec import LearnerSpec
from services.trainer.logs import IterationLog
from services.trainer.replay import Replay
from services.shared.fragment import Fragment
from services.shared.trees import tree_map

log = logging.getLogger(__name__)


def autocast_dtype(use_amp: bool, device: torch.device) -> torch.dtype | None:
    """What train_config.use_amp runs the forward passes in: float16 (with a gradient scaler) on CUDA,
    bfloat16 on a CPU that computes it natively (AVX512-BF16, AMX or Arm's BF16: convolutions and matmuls
    twice as fast as float32), None (float32) otherwise, with a warning. Parameters, gradients and the
    optimizer stay float32 either way."""
    if not use_amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    log.warning("train_config.use_amp=true needs CUDA or a CPU with native bfloat16 (AVX512-BF16, AMX or Arm "
                "BF16); this one has neither, so the trainer runs in full precision")
    return None


class Learner:
    def __init__(self, spec: LearnerSpec):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.session_id = spec.joined.session_id
        self.keys = keys.SessionKeys(self.session_id)
        self.cfg = spec.joined.cfg
        self.tc = self.cfg.train_config
        self.length = self.cfg.rollout_config.fragment_length
        self.client = connect(spec.redis_url)
        module = spec.joined.source.load()
        self.policy = weights.initial_policy(module, self.cfg)  # version 0, as every rollout worker's
        # Ray (and Ray Train) give a rank with num_gpus_per_worker > 0 its own GPU as cuda:0.
        use_gpu = self.tc.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.policy.to(self.device)
        self.ref_policy = None
        if self.tc.kl_divergence_coef_rho != 0:
            self.ref_policy = copy.deepcopy(self.policy).eval()
            self.ref_policy.requires_grad_(False)
        self.optimizer = AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=self.tc.learning_rate,
                               weight_decay=self.tc.weight_decay, eps=self.tc.adam_eps, fused=True)
        self.node_id = spec.node_id
        self.consumer = FragmentConsumer(self.client, self.session_id, f"{self.node_id}-rank{self.rank}")
        # What a dead trainer had read but not retired; a live rank's entries are never taken.
        reclaimed = self.consumer.reclaim({n.node_id for n in session.list_nodes(self.client)})
        if reclaimed:
            log.info("rank %d reclaimed %d fragments pending for a previous trainer", self.rank, reclaimed)
        state = tree_map(lambda t: t.detach().cpu().numpy(), self.policy.initial_state(1))
        self.replay = Replay(self.consumer, self.session_id, self.length, self.cfg.rollout_config.replay_buffer_config,
                             seed=self.cfg.seed * 7919 + self.rank, state_signature=signature(state),
                             stall_timeout=self.tc.stall_timeout, on_wait=self._waiting)
        self.amp = autocast_dtype(self.tc.use_amp, self.device)
        self.learning = ppo.Learning(self.policy, self.ref_policy, self.optimizer,
                                     torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16), self.amp,
                                     self.device)
        self.ranks = Ranks(self.world)
        self.version, self.start_iteration = 0, 0
        self.save_dir = Path(self.tc.save_path or "checkpoints") / self.session_id
        self.source, self.source_text = spec.joined.source, spec.joined.source_text
        pointer = weights.latest_pointer(self.client, self.session_id)
        resumed = None
        if pointer is not None:
            # A trainer ran this session before (this one is its restart, or a replacement): go on from its
            # newest weights, version and iteration, so versions keep growing and rollouts pick the new ones
            # up. The checkpoint a session was resumed from is older than that.
            self.policy.load_state_dict(weights.fetch(self.client, self.session_id, pointer))
            self.version = pointer["version"]
            self.start_iteration = trainer_status.read(self.client, self.session_id).iteration
        elif self.tc.resume:
            # resume=PATH or resume=latest: model, optimizer, rho, iteration and version of a checkpoint.
            path = checkpoints.latest(Path(self.tc.save_path or "checkpoints")) if self.tc.resume == "latest" \
                else Path(self.tc.resume)
            resumed = checkpoints.load(path, self.policy, self.optimizer if self.tc.resume_optimizer else None)
            self.version, self.start_iteration = resumed["model_version"], resumed["iteration"]
            log.info("resumed from %s: iteration %d, version %d", path, self.start_iteration, self.version)
        self.rho = self.tc.kl_divergence_coef_rho * self.tc.coef_rho_decay ** self.start_iteration
        if resumed is not None:
            self.rho = resumed.get("rho", self.rho)
        self.fragments_per_rank = fragments_per_rank(self.cfg)
        self.published = pointer  # the session's newest weights
        if self.rank == 0 and pointer is None:  # version 0, or the resumed weights: rollouts pick them up
            self.published = weights.publish(self.client, self.session_id, self.version, self.policy.state_dict())
        self.logs, self._lags = None, np.zeros(0)
        if self.rank == 0:
            self.logs = IterationLog(self.client, Path(spec.log_dir or "runs"), self.session_id,
                                     self.cfg)

    # -- the outer loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:  # stopped, finished or failed: what the logs hold reaches their files
            if self.logs is not None:
                self.logs.close()

    def _run(self) -> dict:
        tc = self.tc
        self._status(state="SERVICE_STATE_RUNNING", iteration=self.start_iteration)
        stop = lambda: trainer_status.stop_requested(self.client, self.session_id)  # noqa: E731
        for iteration in range(self.start_iteration, tc.num_iterations):
            # Every rank takes the same branch: a Stop takes effect at the next iteration on all of them, and
            # a lease another node holds now stops them all (exactly one trainer trains a session).
            stop_asked, save_asked = trainer_status.requests(self.client, self.session_id)
            stopping, lost = self.ranks.any([stop_asked,
                                             holder(self.client, self.session_id) not in (None, self.node_id)])
            if lost:
                raise RuntimeError(f"trainer node {holder(self.client, self.session_id)} took over session "
                                   f"{self.session_id}; this one stops")
            if stopping:
                self._status(state="SERVICE_STATE_IDLE", iteration=iteration)
                return {"iterations": iteration, "stopped": True}
            ppo.anneal_lr(self.optimizer, tc, iteration)
            start = time.monotonic()
            filled = self.replay.fill(self.fragments_per_rank, self.version, stop)
            if self.ranks.any([not filled])[0]:
                self._status(state="SERVICE_STATE_IDLE", iteration=iteration)
                return {"iterations": iteration, "stopped": True}
            picked, fragments = self.replay.sample(self.fragments_per_rank, self.version)
            waited = time.monotonic() - start
            metrics = self.update(fragments, warmup=iteration < tc.vf_warmup)
            self.rho = ppo.decay_rho(self.rho, tc)
            if iteration >= tc.vf_warmup:  # a new version only when it is published, as the reference: during
                self.version += 1          # warm-up the policy does not change, and data of version 0 stays fresh
                if self.rank == 0:
                    self.published = weights.publish(self.client, self.session_id, self.version,
                                                     self.policy.state_dict(), previous=self.published)
            # Retired only once the new version is announced: a rollout blocked on a full stream wakes at the
            # retirement, and woken before it stepped a burst on the version just replaced, stale an iteration
            # later (cartpole dropped 13-14 % of its fragments so, 4-7 % now).
            self.replay.used(picked)
            metrics.update(replay_fragments=self.replay.held(), replay_capacity=self.replay.capacity,
                           wait_seconds=waited)
            if self.rank == 0:
                steps = self.world * len(fragments) * self.length * tc.epochs_per_iteration
                metrics["samples_per_second"] = steps / max(time.monotonic() - start, 1e-9)
                metrics["learner_samples_per_second"] = steps / max(time.monotonic() - start - waited, 1e-9)
                if save_asked or (tc.save_interval and (iteration + 1) % tc.save_interval == 0):
                    self._checkpoint(iteration + 1)  # a SaveCheckpoint seen at this iteration's start
                self._status(state="SERVICE_STATE_RUNNING", iteration=iteration + 1, metrics=metrics)
                self.logs.write(iteration + 1, {**metrics, "model_version": self.version}, self._lags)
        self._status(state="SERVICE_STATE_FINISHED", iteration=tc.num_iterations)
        return {"iterations": tc.num_iterations, "stopped": False}

    # -- one PPO iteration (ppo.py) ---------------------------------------------------------------------
    def update(self, fragments: list[Fragment], warmup: bool) -> dict:
        """One PPO iteration on this rank's fragments; its metrics, with the policy lag of the data."""
        metrics = ppo.iteration(self.learning, ppo.Batch.of(fragments, self.device), self.tc, self.rho, warmup,
                                self.ranks)
        self._lags = self.version - np.stack([f.model_version for f in fragments])
        metrics["policy_lag"] = float(self._lags.mean())
        return metrics

    # -- checkpoints and logs --------------------------------------------------------------------------
    def _checkpoint(self, iteration: int) -> None:
        path = checkpoints.save(self.save_dir, iteration, self.policy, self.optimizer,
                                {"model_version": self.version, "rho": self.rho, "session_id": self.session_id,
                                 "ledger": ledger(self.client, self.session_id), "config_name": self.source.name,
                                 "config_sha256": self.source.sha256, "config_source": self.source_text})
        checkpoints.thin(self.save_dir, self.tc.keep_interval)
        trainer_status.checkpoint_written(self.client, self.session_id, str(path.resolve()))

    # -- reporting -------------------------------------------------------------------------------------
    def _waiting(self, seconds: float, why: str) -> None:
        """The replay has been waiting for a usable fragment this long: say so in the status."""
        if self.rank == 0:
            trainer_status.report(self.client, self.session_id, waiting=f"no usable fragment for {seconds:.0f}s: {why}")

    def _status(self, state: str, iteration: int, metrics: dict | None = None) -> None:
        if self.rank != 0:
            return
        values = {"state": state, "iteration": iteration, "num_iterations": self.tc.num_iterations,
                  "model_version": self.version, "time": time.time(), "waiting": ""}
        if iteration == 1:
            values["first_update_at"] = time.time()
        if metrics is not None:
            values["metrics"] = metrics
        trainer_status.report(self.client, self.session_id, **values)


class Ranks:
    """The collectives an iteration needs, over the ranks of a Ray Train run (torch.distributed, gloo on CPU,
    nccl on GPU) or trivially for one rank."""

    def __init__(self, world: int):
        self.world = world

    def any(self, flags: list[bool]) -> list[bool]:
        """Each flag or-ed over all ranks, so every rank takes the same branch."""
        if self.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def mean_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over ranks, in one all-reduce."""
        if self.world == 1 or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def mean_buffers(self, module: torch.nn.Module) -> None:
        """Average a module's non-trainable parameters (the value normaliser's statistics) over ranks."""
        if self.world == 1:
            return
        for p in module.parameters():
            if not p.requires_grad:
                dist.all_reduce(p.data)
                p.data /= self.world


def train_loop(config: dict) -> dict:
    """Entry point of a rank: Ray Train's train_loop_per_worker (config {"spec": LearnerSpec}), or called by
    LearnerActor (services/trainer/manager.py)."""
    torch.set_num_threads(1)
    return Learner(config["spec"]).run()


def warm() -> None:
    """Pay the first-use costs before a session: the learner's modules (imported by the caller) and TensorBoard,
    which the logs import."""
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
