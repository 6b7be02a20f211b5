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

import msgpack
import numpy as np
import ray
import torch
import torch.distributed as dist

from mso import keys, weights
from mso.trainer import checkpoints
from mso.codec import CodecError
from mso.config import from_yaml, import_module
from mso.minestudio import adapt
from mso.queue import FragmentConsumer
from mso.redis_server import connect
from mso.trainer.gae import chains, gae
from mso.trainer.ppo import Chunk, chunk_loss
from mso.trees import stack, tree_map

log = logging.getLogger(__name__)

FRAGMENT_FIELDS = ("obs", "action", "reward", "first", "next_done", "logp", "model_version", "in_state",
                   "next_obs", "slot", "seq", "contiguous", "version_first", "session_id")


def check_fragment(fragment, session_id: str, length: int) -> None:
    if not isinstance(fragment, dict):
        raise CodecError(f"fragment is a {type(fragment).__name__}, not a dict")
    missing = [f for f in FRAGMENT_FIELDS if f not in fragment]
    if missing:
        raise CodecError(f"fragment lacks {', '.join(missing)}")
    if fragment["session_id"] != session_id:
        raise CodecError(f"fragment of session {fragment['session_id']!r} in session {session_id!r}")
    for name in ("reward", "first", "next_done", "logp", "model_version"):
        shape = getattr(fragment[name], "shape", None)
        if shape != (length,):
            raise CodecError(f"fragment field {name} has shape {shape}, expected ({length},)")


class Learner:
    def __init__(self, spec: dict):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.session_id = spec["session_id"]
        self.keys = keys.SessionKeys(self.session_id)
        self.cfg = from_yaml(spec["config_yaml"])
        self.tc = self.cfg.train_config
        self.length = self.cfg.rollout_config.fragment_length
        self.max_staleness = self.cfg.rollout_config.replay_buffer_config.max_staleness
        self.client = connect(spec["redis_url"])
        module = import_module(spec["config_name"])
        torch.manual_seed(self.cfg.seed)  # the same initial weights as every rollout node: version 0
        self.policy = adapt(module.policy_generator())  # a MineStudio policy gets mso's contract
        if self.tc.zero_initial_vf:
            with torch.no_grad():
                for p in self.policy.value_head.parameters():
                    p.zero_()
        self.ref_policy = None
        if self.tc.kl_divergence_coef_rho != 0:
            self.ref_policy = copy.deepcopy(self.policy).eval()
            self.ref_policy.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                           lr=self.tc.learning_rate, weight_decay=self.tc.weight_decay,
                                           eps=self.tc.adam_eps)
        self.consumer = FragmentConsumer(self.client, self.session_id, f"{spec['node_id']}-rank{self.rank}")
        reclaimed = self.consumer.reclaim()  # what a dead trainer had read but not retired
        if reclaimed:
            log.info("rank %d reclaimed %d fragments pending for a previous trainer", self.rank, reclaimed)
        self.version, self.start_iteration = 0, 0
        self.save_dir = Path(self.tc.save_path or "checkpoints") / self.session_id
        self.config_source = spec.get("config_source", "")
        pointer = weights.latest_pointer(self.client, self.session_id)
        if self.tc.resume:
            # resume=PATH or resume=latest: model, optimizer, rho, iteration and version of a checkpoint.
            path = checkpoints.latest(Path(self.tc.save_path or "checkpoints")) if self.tc.resume == "latest" \
                else Path(self.tc.resume)
            state = checkpoints.load(path, self.policy, self.optimizer if self.tc.resume_optimizer else None)
            self.version, self.start_iteration = state["model_version"], state["iteration"]
            log.info("resumed from %s: iteration %d, version %d", path, self.start_iteration, self.version)
            pointer = None  # publish the resumed weights so rollouts pick them up
        elif pointer is not None:
            # A trainer ran this session before (this one is its restart): go on from its newest weights, its
            # version and iteration, so versions keep growing and rollouts pick the new ones up.
            self.policy.load_state_dict(weights.fetch(self.client, self.session_id, pointer))
            self.version = pointer["version"]
            self.start_iteration = int(self.client.hget(self.keys.trainer, "iteration") or 0)
        self.rho = self.tc.kl_divergence_coef_rho * self.tc.coef_rho_decay ** self.start_iteration
        if self.tc.resume:
            self.rho = state.get("rho", self.rho)
        self.fragments_per_rank = self.tc.batch_size_per_gpu * self.tc.batches_per_iteration
        if self.rank == 0 and pointer is None:
            weights.publish(self.client, self.session_id, self.version, self.policy.state_dict())
        self.writer, self._last_episode = None, ""
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(spec.get("log_dir") or "runs") / self.session_id))

    # -- the outer loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        tc = self.tc
        self._status(state="SERVICE_STATE_RUNNING", iteration=self.start_iteration)
        for iteration in range(self.start_iteration, tc.num_iterations):
            if tc.anneal_lr_linearly:
                for group in self.optimizer.param_groups:
                    group["lr"] = (1 - iteration / tc.num_iterations) * tc.learning_rate
            start = time.monotonic()
            collected = self._collect(self.fragments_per_rank)
            if self._any_rank(collected is None):
                self._status(state="SERVICE_STATE_IDLE", iteration=iteration)
                return {"iterations": iteration, "stopped": True}
            entry_ids, fragments = collected
            metrics = self._update(fragments, warmup=iteration < tc.vf_warmup)
            self.consumer.retire(entry_ids, "consumed")
            self.version += 1
            self.rho *= tc.coef_rho_decay
            if self.rank == 0:
                if iteration + 1 > tc.vf_warmup:
                    weights.publish(self.client, self.session_id, self.version, self.policy.state_dict())
                steps = self.world * len(fragments) * self.length * tc.epochs_per_iteration
                metrics["samples_per_second"] = steps / max(time.monotonic() - start, 1e-9)
                asked = self.client.hget(self.keys.trainer, "save_now") == b"1"
                if asked or (tc.save_interval and (iteration + 1) % tc.save_interval == 0):
                    self._checkpoint(iteration + 1)
                self._status(state="SERVICE_STATE_RUNNING", iteration=iteration + 1, metrics=metrics)
                self._log(iteration + 1, metrics)
        self._status(state="SERVICE_STATE_FINISHED", iteration=tc.num_iterations)
        if self.writer is not None:
            self.writer.close()
        return {"iterations": tc.num_iterations, "stopped": False}

    # -- data ------------------------------------------------------------------------------------------
    def _collect(self, n: int):
        """(entry ids, fragments) of n fresh fragments, or None when a stop was requested."""
        ids, fragments = [], []
        while len(fragments) < n:
            if self.client.hget(self.keys.trainer, "stop") == b"1":
                return None
            stale, corrupt = [], []
            for entry_id, fragment in self.consumer.read(n - len(fragments), block_ms=200):
                try:
                    check_fragment(fragment, self.session_id, self.length)
                except CodecError as exc:
                    log.warning("dropping malformed fragment %s: %s", entry_id, exc)
                    corrupt.append(entry_id)
                    continue
                if self.version - fragment["version_first"] > self.max_staleness:
                    stale.append(entry_id)
                    continue
                ids.append(entry_id)
                fragments.append(fragment)
            self.consumer.retire(stale, "dropped_stale")
            self.consumer.retire(corrupt, "dropped_corrupt")
        return ids, fragments

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # -- one PPO iteration -----------------------------------------------------------------------------
    def _update(self, fragments: list[dict], warmup: bool) -> dict:
        tc, policy, n, t_len, c_len = self.tc, self.policy, len(fragments), self.length, self.tc.context_length
        to_tensor = lambda leaves: torch.as_tensor(np.stack(leaves))  # noqa: E731
        obs = stack([f["obs"] for f in fragments], to_tensor)
        action = stack([f["action"] for f in fragments], to_tensor)
        first = torch.as_tensor(np.stack([f["first"] for f in fragments]))
        next_done = np.stack([f["next_done"] for f in fragments])
        rewards = np.stack([f["reward"] for f in fragments])
        behaviour_logp = torch.as_tensor(np.stack([f["logp"] for f in fragments]))
        next_obs = stack([tree_map(lambda a: np.asarray(a)[None], f["next_obs"]) for f in fragments], to_tensor)
        in_states = [tree_map(torch.as_tensor, f["in_state"]) for f in fragments]
        lag = float(np.mean([self.version - f["model_version"] for f in fragments]))

        # Values of the current model, carrying the recurrent state from each fragment's in_state.
        policy.eval()
        with torch.inference_mode():
            state, raw = policy.merge_state(in_states), []
            for s in range(0, t_len, c_len):
                e = min(s + c_len, t_len)
                latents, state = policy(tree_map(lambda x: x[:, s:e], obs), state, context={"first": first[:, s:e]})
                raw.append(latents["vpred"].reshape(n, e - s))
            raw_v = torch.cat(raw, dim=1)
            boot_latents, _ = policy(next_obs, state,
                                     context={"first": torch.as_tensor(next_done[:, -1:])})
            boot = boot_latents["vpred"].reshape(n)
            if tc.use_normalized_vf:
                values, boot = policy.value_head.denormalize(raw_v), policy.value_head.denormalize(boot)
            else:
                values = raw_v
        chain_list = chains([f["slot"] for f in fragments], [f["seq"] for f in fragments],
                            [f["contiguous"] for f in fragments])
        adv, target = gae(rewards, values.numpy().astype(np.float64), next_done, boot.numpy(), chain_list,
                          tc.discount, tc.gae_lambda)
        adv, target = torch.as_tensor(adv), torch.as_tensor(target)
        if tc.normalize_advantage_full_batch:
            total, total_sq, count = self._all_sum([adv.sum().item(), (adv ** 2).sum().item(), adv.numel()])
            mean = total / count
            std = max(total_sq / count - mean ** 2, 0.0) ** 0.5
            adv = (adv - mean) / (std + 1e-8)

        policy.train()
        sums: dict[str, float] = {}
        weight_total, broken = 0.0, 0
        b = tc.batch_size_per_gpu
        for _epoch in range(tc.epochs_per_iteration):
            perm = torch.randperm(n)
            self.optimizer.zero_grad()
            for bi in range(tc.batches_per_iteration):
                idx = perm[bi * b:(bi + 1) * b]
                state = policy.merge_state([in_states[i] for i in idx])
                ref_state = state if self.ref_policy is not None else None
                for s in range(0, t_len, c_len):
                    e = min(s + c_len, t_len)
                    sl = lambda x: x[idx, s:e]  # noqa: E731
                    chunk = Chunk(obs=tree_map(sl, obs), action=tree_map(sl, action), first=sl(first),
                                  behaviour_logp=sl(behaviour_logp), advantage=sl(adv), target=sl(target),
                                  old_vpred=sl(raw_v))
                    loss, m, state, ref_state = chunk_loss(policy, self.ref_policy, chunk, state, ref_state, tc,
                                                           self.rho, warmup)
                    state = tree_map(lambda x: x.detach(), state)
                    if self._any_rank(not torch.isfinite(loss).item()):
                        broken += 1
                        break
                    weight = (e - s) / t_len
                    (loss * weight / tc.gradient_accumulation).backward()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + v * weight
                    weight_total += weight
                if (bi + 1) % tc.gradient_accumulation == 0:
                    self._step()
        metrics = {k: v / max(weight_total, 1e-9) for k, v in sums.items()}
        metrics.update(policy_lag=lag, broken_num_lossnan=broken, learning_rate=self.optimizer.param_groups[0]["lr"],
                       rho=self.rho, buffer_reward=float(rewards.sum(1).mean()))
        return metrics

    def _step(self) -> None:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, self.tc.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    # -- checkpoints and logs --------------------------------------------------------------------------
    def _checkpoint(self, iteration: int) -> None:
        path = checkpoints.save(self.save_dir, iteration, self.policy, self.optimizer,
                                {"model_version": self.version, "rho": self.rho, "session_id": self.session_id},
                                self.config_source)
        checkpoints.thin(self.save_dir, self.tc.keep_interval)
        self.client.hset(self.keys.trainer, mapping={"last_checkpoint": str(path.resolve()), "save_now": "0"})

    def _log(self, iteration: int, metrics: dict) -> None:
        """TensorBoard scalars of the iteration, and the episodes finished since the last call."""
        for k, v in metrics.items():
            self.writer.add_scalar(f"trainer/{k}", v, iteration)
        self.writer.add_scalar("trainer/model_version", self.version, iteration)
        entries = self.client.xrange(self.keys.episodes, min=f"({self._last_episode}" if self._last_episode else "-")
        if entries:
            self._last_episode = entries[-1][0].decode()
            episodes = [msgpack.unpackb(f[b"e"]) for _i, f in entries]
            for k in ("return", "discounted_return", "length"):
                self.writer.add_scalar(f"episode/mean_{k}", float(np.mean([e[k] for e in episodes])), iteration)
            self.writer.add_scalar("episode/count", len(episodes), iteration)
        self.writer.flush()

    # -- reporting -------------------------------------------------------------------------------------
    def _status(self, state: str, iteration: int, metrics: dict | None = None) -> None:
        if self.rank != 0:
            return
        mapping = {"state": state, "iteration": iteration, "num_iterations": self.tc.num_iterations,
                   "model_version": self.version, "time": time.time()}
        if iteration == 1:
            mapping["first_update_at"] = time.time()
        if metrics is not None:
            mapping["metrics"] = msgpack.packb(metrics)
        self.client.hset(self.keys.trainer, mapping=mapping)


def train_loop(spec: dict) -> dict:
    """Entry point of a rank: Ray Train's train_loop_per_worker, or called by LearnerActor."""
    torch.set_num_threads(spec.get("torch_threads", 1))
    return Learner(spec).run()


@ray.remote
class LearnerActor:
    """The single-rank learner as a plain Ray actor (no Ray Train start-up cost)."""

    def run(self, spec: dict) -> dict:
        return train_loop(spec)
