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
import ray
import torch
import torch.distributed as dist

from services.shared import keys, session, trainer_status, weights
from services.shared.fragment import signature
from services.shared.minestudio import adapt
from services.shared.queue import FragmentConsumer, ledger
from services.shared.redis_server import connect
from services.trainer import checkpoints
from services.trainer.gae import chains, gae
from services.trainer.lease import holder
from services.trainer.spec import LearnerSpec
from services.trainer.logs import IterationLog
from services.trainer.ppo import Chunk, chunk_loss
from services.trainer.replay import Replay
from services.shared.trees import stack, tree_map

log = logging.getLogger(__name__)
CPU_EVAL_STEPS = 128  # time steps per re-evaluation forward pass on a CPU (benchmarks/learner.py, crafter)


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
        torch.manual_seed(self.cfg.seed)  # the same initial weights as every rollout node: version 0
        self.policy = adapt(module.policy_generator())  # a MineStudio policy gets mso's contract
        # Ray (and Ray Train) give a rank with num_gpus_per_worker > 0 its own GPU as cuda:0.
        use_gpu = self.tc.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.policy.to(self.device)
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
                                           eps=self.tc.adam_eps, fused=True)
        self.node_id = spec.node_id
        self.consumer = FragmentConsumer(self.client, self.session_id, f"{self.node_id}-rank{self.rank}")
        # What a dead trainer had read but not retired; a live rank's entries are never taken.
        reclaimed = self.consumer.reclaim({n["node_id"] for n in session.list_nodes(self.client)})
        if reclaimed:
            log.info("rank %d reclaimed %d fragments pending for a previous trainer", self.rank, reclaimed)
        state = tree_map(lambda t: t.detach().cpu().numpy(), self.policy.initial_state(1))
        self.replay = Replay(self.consumer, self.session_id, self.length, self.cfg.rollout_config.replay_buffer_config,
                             seed=self.cfg.seed * 7919 + self.rank, state_signature=signature(state),
                             stall_timeout=self.tc.stall_timeout, on_wait=self._waiting)
        self.amp = self.tc.use_amp and self.device.type == "cuda"
        if self.tc.use_amp and not self.amp:
            log.warning("train_config.use_amp=true needs CUDA; this trainer runs on the CPU in full precision")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
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
        self.fragments_per_rank = self.tc.batch_size_per_gpu * self.tc.batches_per_iteration
        if self.rank == 0 and pointer is None:  # version 0, or the resumed weights: rollouts pick them up
            weights.publish(self.client, self.session_id, self.version, self.policy.state_dict())
        self.logs, self._lags = None, np.zeros(0)
        if self.rank == 0:
            self.logs = IterationLog(self.client, self.keys, Path(spec.log_dir or "runs"), self.session_id,
                                     self.cfg)

    # -- the outer loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        tc = self.tc
        self._status(state="SERVICE_STATE_RUNNING", iteration=self.start_iteration)
        stop = lambda: trainer_status.stop_requested(self.client, self.session_id)  # noqa: E731
        for iteration in range(self.start_iteration, tc.num_iterations):
            # Every rank takes the same branch: a Stop takes effect at the next iteration on all of them, and
            # a lease another node holds now stops them all (exactly one trainer trains a session).
            stopping, lost = self._any_ranks([stop(), holder(self.client, self.session_id) not in (None, self.node_id)])
            if lost:
                raise RuntimeError(f"trainer node {holder(self.client, self.session_id)} took over session "
                                   f"{self.session_id}; this one stops")
            if stopping:
                self._status(state="SERVICE_STATE_IDLE", iteration=iteration)
                return {"iterations": iteration, "stopped": True}
            if tc.anneal_lr_linearly:
                for group in self.optimizer.param_groups:
                    group["lr"] = (1 - iteration / tc.num_iterations) * tc.learning_rate
            start = time.monotonic()
            filled = self.replay.fill(self.fragments_per_rank, self.version, stop)
            if self._any_ranks([not filled])[0]:
                self._status(state="SERVICE_STATE_IDLE", iteration=iteration)
                return {"iterations": iteration, "stopped": True}
            picked, fragments = self.replay.sample(self.fragments_per_rank, self.version)
            waited = time.monotonic() - start
            metrics = self._update(fragments, warmup=iteration < tc.vf_warmup)
            self.replay.used(picked)
            metrics.update(replay_fragments=self.replay.held(), replay_capacity=self.replay.capacity,
                           wait_seconds=waited)
            self.rho *= tc.coef_rho_decay
            if iteration >= tc.vf_warmup:  # a new version only when it is published, as the reference: during
                self.version += 1          # warm-up the policy does not change, and data of version 0 stays fresh
                if self.rank == 0:
                    weights.publish(self.client, self.session_id, self.version, self.policy.state_dict())
            if self.rank == 0:
                steps = self.world * len(fragments) * self.length * tc.epochs_per_iteration
                metrics["samples_per_second"] = steps / max(time.monotonic() - start, 1e-9)
                metrics["learner_samples_per_second"] = steps / max(time.monotonic() - start - waited, 1e-9)
                asked = trainer_status.checkpoint_requested(self.client, self.session_id)
                if asked or (tc.save_interval and (iteration + 1) % tc.save_interval == 0):
                    self._checkpoint(iteration + 1)
                self._status(state="SERVICE_STATE_RUNNING", iteration=iteration + 1, metrics=metrics)
                self.logs.write(iteration + 1, {**metrics, "model_version": self.version}, self._lags)
        self._status(state="SERVICE_STATE_FINISHED", iteration=tc.num_iterations)
        if self.logs is not None:
            self.logs.close()
        return {"iterations": tc.num_iterations, "stopped": False}

    # -- collectives ----------------------------------------------------------------------------------
    def _any_ranks(self, flags: list[bool]) -> list[bool]:
        """Each flag or-ed over all ranks, so every rank takes the same branch."""
        if self.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # -- one PPO iteration -----------------------------------------------------------------------------
    def _update(self, fragments: list[dict], warmup: bool) -> dict:
        tc, policy, n, t_len, c_len = self.tc, self.policy, len(fragments), self.length, self.tc.context_length
        to_tensor = lambda leaves: torch.as_tensor(np.stack(leaves), device=self.device)  # noqa: E731
        obs = stack([f["obs"] for f in fragments], to_tensor)
        action = stack([f["action"] for f in fragments], to_tensor)
        first = to_tensor([f["first"] for f in fragments])
        next_done = np.stack([f["next_done"] for f in fragments])
        rewards = np.stack([f["reward"] for f in fragments])
        cut_values = np.stack([f["truncation_value"] * f["next_truncated"] for f in fragments])
        behaviour_logp = to_tensor([f["logp"] for f in fragments])
        next_obs = stack([tree_map(lambda a: np.asarray(a)[None], f["next_obs"]) for f in fragments], to_tensor)
        in_states = [tree_map(lambda a: torch.as_tensor(a, device=self.device), f["in_state"]) for f in fragments]
        lags = self.version - np.stack([f["model_version"] for f in fragments])

        raw_v, old_logp, values, boot = self._evaluate(obs, action, first, next_obs, next_done, in_states)
        chain_list = chains([f["slot"] for f in fragments], [f["seq"] for f in fragments],
                            [f["contiguous"] for f in fragments])
        values, boot = values.cpu().numpy().astype(np.float64), boot.cpu().numpy()
        adv, target = gae(rewards, values, next_done, boot, chain_list, tc.discount, tc.gae_lambda, cut_values)
        explained = self._explained_variance(values, target)
        adv, target = torch.as_tensor(adv, device=self.device), torch.as_tensor(target, device=self.device)
        if tc.normalize_advantage_full_batch:
            total, total_sq, count = self._all_sum([adv.sum().item(), (adv ** 2).sum().item(), adv.numel()])
            mean = total / count
            std = max(total_sq / count - mean ** 2, 0.0) ** 0.5
            adv = (adv - mean) / (std + 1e-8)

        policy.train()
        policy.value_head.eval()  # the EWMA normaliser is updated once per optimizer step, below, not per loss
        sums: dict[str, float] = {}
        weight_total, broken_nan, broken_kl = 0.0, 0, 0
        ga = tc.gradient_accumulation
        for _epoch in range(tc.epochs_per_iteration):
            batches = np.array_split(torch.randperm(n).numpy(), tc.batches_per_iteration)
            self.optimizer.zero_grad()
            for bi, idx in enumerate(batches):
                if bi % ga == 0 and tc.use_normalized_vf:
                    window = np.concatenate(batches[bi:bi + ga])
                    self._update_normalizer(target[window])
                saved = [None if p.grad is None else p.grad.clone() for p in self._params()] if bi % ga else None
                state = policy.merge_state([in_states[i] for i in idx])
                ref_state = state if self.ref_policy is not None else None
                batch_sums, batch_weight = {}, 0.0
                for s in range(0, t_len, c_len):
                    e = min(s + c_len, t_len)
                    sl = lambda x: x[idx, s:e]  # noqa: E731
                    chunk = Chunk(obs=tree_map(sl, obs), action=tree_map(sl, action), first=sl(first),
                                  behaviour_logp=sl(behaviour_logp), old_logp=sl(old_logp), advantage=sl(adv),
                                  target=sl(target), old_vpred=sl(raw_v))
                    with torch.autocast(self.device.type, enabled=self.amp):
                        loss, m, state, ref_state = chunk_loss(policy, self.ref_policy, chunk, state, ref_state, tc,
                                                               self.rho, warmup)
                    state = tree_map(lambda x: x.detach(), state)
                    nan, kl_high = self._any_ranks([not torch.isfinite(loss).item(), m["approx_kl"] > tc.max_approx_kl])
                    if nan or kl_high:
                        # Skip the whole batch on every rank together: drop what its earlier chunks added.
                        broken_nan, broken_kl = broken_nan + nan, broken_kl + (kl_high and not nan)
                        for p, g in zip(self._params(), saved or [None] * len(self._params())):
                            p.grad = g
                        batch_sums, batch_weight = {}, 0.0
                        break
                    weight = (e - s) / t_len
                    self.scaler.scale(loss * weight / ga).backward()
                    for k, v in m.items():
                        batch_sums[k] = batch_sums.get(k, 0.0) + v * weight
                    batch_weight += weight
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                weight_total += batch_weight
                if (bi + 1) % ga == 0:
                    self._step()
        metrics = {k: v / max(weight_total, 1e-9) for k, v in sums.items()}
        metrics.update(policy_lag=float(lags.mean()), broken_num_lossnan=broken_nan, broken_num_kl=broken_kl,
                       learning_rate=self.optimizer.param_groups[0]["lr"], rho=self.rho,
                       buffer_reward=float(rewards.sum(1).mean()), explained_var=explained,
                       abs_advantage=float(adv.abs().mean()), abs_td_target=float(target.abs().mean()),
                       truncations=int(np.count_nonzero(cut_values)))
        self._lags = lags
        return metrics

    @torch.inference_mode()
    def _evaluate(self, obs, action, first, next_obs, next_done, in_states):
        """log pi_old(a|s) and V of the current model, carrying the recurrent state from each fragment's
        in_state, in groups of batch_size_per_gpu fragments on a GPU and of about CPU_EVAL_STEPS steps on a
        CPU, where a convolution over 128 frames ran 40% faster per frame than over 512 (cache).
        Returns raw V (the head's space), log pi_old, V and V(next_obs) in the return scale."""
        policy, tc, n, t_len, c_len = self.policy, self.tc, len(in_states), self.length, self.tc.context_length
        policy.eval()
        raw_v, old_logp = torch.zeros(n, t_len, device=self.device), torch.zeros(n, t_len, device=self.device)
        boot = torch.zeros(n, device=self.device)
        group = tc.batch_size_per_gpu if self.device.type != "cpu" else max(1, CPU_EVAL_STEPS // t_len)
        for g in range(0, n, group):
            rows = slice(g, min(g + group, n))
            state = policy.merge_state(in_states[rows])
            for s in range(0, t_len, c_len):
                e = min(s + c_len, t_len)
                sl = lambda x: x[rows, s:e]  # noqa: E731
                latents, state = policy(tree_map(sl, obs), state, context={"first": sl(first)})
                raw_v[rows, s:e] = latents["vpred"].reshape(-1, e - s)
                old_logp[rows, s:e] = policy.pi_head.logprob(tree_map(sl, action),
                                                             latents["pi_logits"]).reshape(-1, e - s)
            latents, _ = policy(tree_map(lambda x: x[rows], next_obs), state,
                                context={"first": torch.as_tensor(next_done[rows, -1:], device=self.device)})
            boot[rows] = latents["vpred"].reshape(-1)
        if tc.use_normalized_vf:
            values, boot = policy.value_head.denormalize(raw_v).reshape(n, t_len), \
                policy.value_head.denormalize(boot).reshape(n)
        else:
            values = raw_v
        return raw_v, old_logp, values, boot

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _step(self) -> None:
        params = [p for p in self._params() if p.grad is not None]
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        if params:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.tc.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad()

    def _update_normalizer(self, targets: torch.Tensor) -> None:
        """One EWMA update of the value normaliser with this optimizer step's targets, averaged over ranks
        (the update is linear in the batch moments, so the average equals an update with all ranks' data)."""
        head = self.policy.value_head
        head.train()
        head.normalize(targets.float())
        head.eval()
        if self.world > 1:
            for p in head.parameters():
                if not p.requires_grad:
                    dist.all_reduce(p.data)
                    p.data /= self.world

    def _explained_variance(self, values: np.ndarray, targets: np.ndarray) -> float:
        """1 - Var(target - V) / Var(target) over all ranks' steps."""
        d = targets - values
        s = self._all_sum([targets.sum(), (targets ** 2).sum(), d.sum(), (d ** 2).sum(), targets.size])
        var_t = s[1] / s[4] - (s[0] / s[4]) ** 2
        var_d = s[3] / s[4] - (s[2] / s[4]) ** 2
        return float(1 - var_d / var_t) if var_t > 1e-12 else 0.0

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


def train_loop(config: dict) -> dict:
    """Entry point of a rank: Ray Train's train_loop_per_worker (config {"spec": LearnerSpec}), or called by
    LearnerActor."""
    torch.set_num_threads(1)
    return Learner(config["spec"]).run()


@ray.remote
class LearnerActor:
    """The single-rank learner as a plain Ray actor (no Ray Train start-up cost)."""

    def warm(self) -> None:
        """Pay the first-use costs before a session: the first optimizer imports torch._dynamo (a second on
        these machines), and the logs import TensorBoard."""
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    def run(self, spec: LearnerSpec) -> dict:
        return train_loop({"spec": spec})
