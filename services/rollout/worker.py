"""RolloutWorker: a Ray actor that owns num_envs env subprocesses, batches inference over whichever envs
are ready, cuts fragments and pushes them to the session's Redis stream. The loop itself is RolloutLoop,
a plain class, so the actor adds only the Ray boundary.

The loop never busy-waits: it blocks on the env pipes and runs a batch as soon as batch_size observations
are waiting, or BATCH_DEADLINE after the first one, so a slow or restarting env never stalls the others.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
import uuid
from multiprocessing.connection import wait

import msgpack
import numpy as np
import ray
import torch

from services.shared import keys
from services.shared.session import Joined
from services.shared.minestudio import adapt
from services.shared.queue import FragmentProducer
from services.shared.redis_server import connect
from services.rollout.envs import EnvGroup, EnvProcess
from services.rollout.fragments import FragmentCutter, Step
from services.shared.trees import stack, tree_map
from services.shared.weights import WeightWatcher

log = logging.getLogger(__name__)

# Seconds to wait for a fuller batch once one observation is ready. Every env in the batch waits this long
# for its action: at 5 ms, 8 Minecraft-paced envs (50 ms steps) reached 0.89 of their own speed, at 1 ms 0.93.
BATCH_DEADLINE = 0.001
EPISODES_KEPT = 10_000  # entries the episode stream keeps
SEND_BATCH = 64         # queued items the sender takes at once


def signature(tree):
    """The structure, dtypes and shapes of an observation, to refuse one that cannot be batched."""
    if isinstance(tree, np.ndarray):
        return (tree.dtype, tree.shape)
    if isinstance(tree, dict):
        return tuple(sorted((k, signature(v)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return tuple(signature(v) for v in tree)
    a = np.asarray(tree)
    return (a.dtype, a.shape)


def check_weights(policy: torch.nn.Module, state: dict) -> None:
    """Refuse a state dict whose keys or shapes differ, before any parameter is touched."""
    own = policy.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")


def one_step(policy, observations: list, states: list, first: list[bool]):
    """The policy on one time step of several envs: their (B,) observations as (B, 1, ...) tensors, their
    states merged; returns (latents, state_out)."""
    device = policy.device
    obs = tree_map(lambda a: torch.as_tensor(a[:, None], device=device), stack(observations))
    context = {"first": torch.tensor([[f] for f in first], device=device)}
    return policy(obs, policy.merge_state(states), context=context)


def values(policy, latents: dict, use_normalized_vf: bool) -> np.ndarray:
    """V of each env of a one_step batch, in the return scale."""
    v = latents["vpred"].reshape(-1, 1)
    if use_normalized_vf:
        v = policy.value_head.denormalize(v)
    return v.reshape(-1).cpu().numpy()


class RolloutLoop:
    """Steps one worker's envs until stop is set. `stats` is read by status calls from other threads."""

    def __init__(self, worker_index: int, joined: Joined, redis_url: str, node_id: str):
        self.index, self.session_id, self.redis_url = worker_index, joined.session_id, redis_url
        self.source, self.cfg, self.node_id = joined.source, joined.cfg, node_id
        self.stats = {"env_steps": 0, "fragments_pushed": 0, "bytes_pushed": 0, "episodes": 0,
                      "env_restarts": 0, "env_timeouts": 0, "steps_dropped": 0, "model_version": 0,
                      "live_envs": 0, "inference_ms": 0.0, "videos": 0, "malformed_obs": 0, "last_error": "",
                      "fatal": False}  # fatal: no env of this worker can be built (a config error, not a crash)
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.stats["last_error"] = traceback.format_exc(limit=5)
            log.error("rollout worker %d failed:\n%s", self.index, self.stats["last_error"])

    def _run(self) -> None:
        rc, wc, tc = self.cfg.rollout_config, self.cfg.rollout_config.worker_config, self.cfg.train_config
        client = connect(self.redis_url)
        self.keys = keys.SessionKeys(self.session_id)
        module = self.source.load()
        torch.manual_seed(self.cfg.seed)  # identical to the trainer's initial weights: version 0
        policy = adapt(module.policy_generator())  # a MineStudio policy gets mso's contract
        policy.eval()
        max_staleness = rc.replay_buffer_config.max_staleness
        use_normalized_vf = tc.use_normalized_vf  # read per step: an OmegaConf lookup costs microseconds
        version = 0
        watcher = WeightWatcher(connect(self.redis_url), self.session_id).start()

        producer = FragmentProducer(client, self.session_id, rc.max_pending_fragments)
        outbox: queue.Queue = queue.Queue(maxsize=rc.to_send_queue_size)
        sender = threading.Thread(target=self._send_loop, args=(producer, client, outbox), name="sender",
                                  daemon=True)
        sender.start()

        seed = (self.cfg.seed * 100_003 + self.index * 1009 + os.getpid()) % (2 ** 31)
        k = wc.envs_per_process
        if k == 0:  # every env in this thread: no process, no pipe
            procs = [EnvGroup(list(range(wc.num_envs)), self.source, [seed + i for i in range(wc.num_envs)],
                              tc.discount, wc.restart_interval, wc.video_fps)]
        else:
            procs = [EnvProcess(list(range(first, min(first + k, wc.num_envs))), self.source,
                                [seed + i for i in range(first, min(first + k, wc.num_envs))], tc.discount,
                                wc.restart_interval, wc.video_fps, wc.env_timeout, wc.env_start_timeout)
                     for first in range(0, wc.num_envs, k)]
        owner = {i: p for p, proc in enumerate(procs) for i in proc.slots}  # slot -> index of its process
        slot_ids = [f"{self.node_id}-w{self.index}-e{i}" for i in range(wc.num_envs)]
        cutters = [FragmentCutter(self.session_id, slot_ids[i], rc.fragment_length) for i in range(wc.num_envs)]
        states = [policy.initial_state(1) for _ in range(wc.num_envs)]
        episode_ids = [uuid.uuid4().hex for _ in range(wc.num_envs)]
        videos: dict[int, str] = {}      # slot -> path to send with its next action
        pending: dict[int, tuple] = {}   # slot -> message waiting for an action
        obs_signature = None             # structure, dtypes and shapes of the first observation seen
        broken: set[int] = set()         # processes whose env cannot be built: reported, not respawned
        target = min(wc.batch_size, wc.num_envs)
        deadline = 0.0

        def restart(p: int, why: str) -> None:
            """Respawn env process p; every slot it steps loses its partial fragment."""
            log.warning("env process %d (envs %s) of worker %d: %s; restarting it", p, procs[p].slots, self.index, why)
            self.stats["env_restarts"] += 1
            for i in procs[p].slots:
                self.stats["steps_dropped"] += cutters[i].drop()
                pending.pop(i, None)
                states[i] = policy.initial_state(1)
            procs[p].restart()

        self.stats["live_envs"] = wc.num_envs
        try:
            while not self.stop_event.is_set():
                idle = [p for p in range(len(procs)) if procs[p].slots[0] not in pending and p not in broken]
                if len(broken) == len(procs):
                    self.stats["fatal"] = True
                    break  # nothing can run; last_error says why
                if idle and len(pending) < target:
                    ready = [p for p in idle if procs[p].conn is None]  # in-thread envs have answered already
                    waiting = {procs[p].conn: p for p in idle if procs[p].conn is not None}
                    timeout = 0.0 if ready else max(0.0, deadline - time.monotonic()) if pending else 0.5
                    if waiting:
                        ready += [waiting[conn] for conn in wait(list(waiting), timeout=timeout)]
                    for p in ready:
                        try:
                            messages = procs[p].recv()
                        except (EOFError, OSError):
                            restart(p, "env process died")
                            continue
                        if isinstance(messages, tuple):  # ("fatal", reason): its env cannot be built at all
                            self.stats["last_error"] = f"env {procs[p].slots[0]}: {messages[1]}"
                            log.error(self.stats["last_error"])
                            broken.add(p)
                            self.stats["live_envs"] -= len(procs[p].slots)
                            continue
                        for i, message in zip(procs[p].slots, messages):
                            if message[5]:  # the env rebuilt itself after an exception
                                self.stats["env_restarts"] += 1
                                self.stats["steps_dropped"] += cutters[i].drop()
                            if message[6] is not None and signature(message[6]) != signature(message[0]):
                                self.stats["malformed_obs"] += 1  # not bootstrapped: the cut counts as an end
                                message = message[:6] + (None,)
                            pending[i] = message
                        shapes = {signature(pending[i][0]) for i in procs[p].slots}
                        obs_signature = obs_signature or next(iter(shapes))
                        if shapes != {obs_signature}:
                            self.stats["malformed_obs"] += 1
                            restart(p, f"malformed observation {shapes - {obs_signature}}, expected {obs_signature}")
                    now = time.monotonic()
                    for p in [p for p in idle if procs[p].slots[0] not in pending and p not in broken]:
                        if now > procs[p].deadline:
                            self.stats["env_timeouts"] += 1
                            restart(p, "no answer within worker_config.env_timeout / env_start_timeout")
                    if not pending:
                        continue
                    if len(pending) < target:
                        if deadline == 0.0:
                            deadline = time.monotonic() + BATCH_DEADLINE
                        if time.monotonic() < deadline:
                            continue
                deadline = 0.0

                ready = watcher.take()
                if ready is not None:
                    try:
                        check_weights(policy, ready[1])
                        policy.load_state_dict(ready[1])
                        version = ready[0]
                        self.stats["model_version"] = version
                        if tc.record_video_interval and version % tc.record_video_interval == 0:
                            for i in range(min(wc.videos_per_worker, wc.num_envs)):
                                videos[i] = os.path.join(wc.video_output_dir, self.session_id,
                                                         f"v{version:06d}-{slot_ids[i]}.mp4")
                    except ValueError as exc:
                        self.stats["last_error"] = f"kept version {version}: cannot load version {ready[0]}: {exc}"
                        log.error(self.stats["last_error"])

                batch = sorted(pending)
                msgs = [pending.pop(i) for i in batch]
                cut_values = self._truncation_values(policy, [m[6] for m in msgs], [states[i] for i in batch],
                                                     use_normalized_vf)
                for i, msg in zip(batch, msgs):
                    if msg[2] or msg[3]:  # a new episode: fresh recurrent state
                        states[i] = policy.initial_state(1)
                        episode_ids[i] = uuid.uuid4().hex
                    if msg[4] is not None:
                        self._episode(outbox, msg[4], version, slot_ids[i])
                started = time.perf_counter()
                with torch.inference_mode():
                    latents, state_out = one_step(policy, [m[0] for m in msgs], [states[i] for i in batch],
                                                  [bool(m[2] or m[3]) for m in msgs])
                    action = policy.pi_head.sample(latents["pi_logits"])
                    logp = policy.pi_head.logprob(action, latents["pi_logits"]).reshape(-1).cpu().numpy()
                    vpred = values(policy, latents, use_normalized_vf)
                    new_states = policy.split_state(state_out, len(batch))
                actions = tree_map(lambda t: t.detach().cpu().numpy(), action)
                self.stats["inference_ms"] = 0.9 * self.stats["inference_ms"] + \
                    0.1 * 1000 * (time.perf_counter() - started)
                chosen: dict[int, tuple] = {}  # slot -> (action, video path) to send to its process
                for j, i in enumerate(batch):
                    obs_i, last_reward, terminated, truncated = msgs[j][:4]
                    act = tree_map(lambda a: a[j, 0], actions)  # this env's action at its one time step
                    cutter = cutters[i]
                    if cutter.buffer and version - cutter.buffer[0].version > max_staleness:
                        self.stats["steps_dropped"] += cutter.drop()
                    state_np = tree_map(lambda t: t.detach().cpu().numpy(), states[i]) if cutter.needs_state() else None
                    fragment = cutter.add(Step(obs_i, state_np, act, float(logp[j]), float(vpred[j]),
                                               float(last_reward), bool(terminated), bool(truncated), version,
                                               episode_ids[i], last_truncation_value=cut_values[j]))
                    states[i] = new_states[j]
                    chosen[i] = (act, videos.pop(i, None))
                    if fragment is not None:
                        outbox.put(("fragment", fragment))  # blocks while the sender is behind: backpressure
                for p in sorted({owner[i] for i in batch}):
                    try:
                        procs[p].send([chosen.pop(i) for i in procs[p].slots])
                    except (BrokenPipeError, OSError):
                        restart(p, "env process died")
                self.stats["env_steps"] += len(batch)
        finally:
            outbox.put(None)
            sender.join(timeout=10)
            watcher.stop()
            for proc in procs:
                proc.close(timeout=2)
            self.stats["live_envs"] = 0

    @staticmethod
    def _truncation_values(policy, final_obs: list, states: list, use_normalized_vf: bool) -> list[float]:
        """V(final obs) for each env whose episode a time limit just cut, from the recurrent state that
        observation continues (the behaviour policy's value: the learner never sees that observation), so
        GAE can bootstrap the cut instead of treating it as a real end; 0.0 for the others."""
        out = [0.0] * len(final_obs)
        cut = [j for j, o in enumerate(final_obs) if o is not None]
        if not cut:
            return out
        with torch.inference_mode():
            latents, _ = one_step(policy, [final_obs[j] for j in cut], [states[j] for j in cut], [False] * len(cut))
            for j, x in zip(cut, values(policy, latents, use_normalized_vf).tolist()):
                out[j] = x
        return out

    def _episode(self, outbox: queue.Queue, episode: dict, version: int, slot_id: str) -> None:
        self.stats["episodes"] += 1
        self.stats["videos"] += episode["video"] is not None
        outbox.put(("episode", {**episode, "version": version, "slot": slot_id, "worker": self.index}))

    def _send_loop(self, producer: FragmentProducer, client, outbox: queue.Queue) -> None:
        """Pushes fragments and episode records off the stepping thread; the records queued together share
        one round trip (short CartPole episodes end a thousand times a second)."""
        while True:
            items = [outbox.get()]
            while items[-1] is not None and len(items) < SEND_BATCH:
                try:
                    items.append(outbox.get_nowait())
                except queue.Empty:
                    break
            self._write_episodes(client, [record for kind, record in filter(None, items) if kind == "episode"])
            for kind, fragment in filter(None, items):
                if kind == "fragment":
                    self._push(producer, fragment)
            if items[-1] is None:
                return

    def _write_episodes(self, client, records: list[dict]) -> None:
        if not records:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for record in records:
                pipe.xadd(self.keys.episodes, {b"e": msgpack.packb(record)}, maxlen=EPISODES_KEPT, approximate=True)
            pipe.hincrby(self.keys.ledger, "episodes", len(records))
            pipe.execute()
        except Exception as exc:
            self.stats["last_error"] = f"cannot write episode statistics: {exc}"
            log.error(self.stats["last_error"])

    def _push(self, producer: FragmentProducer, fragment: dict) -> None:
        try:
            # Stopping while the stream is full: the fragment is never produced, the ledger stays exact.
            size = producer.push(fragment, env_steps=len(fragment["reward"]), should_stop=self.stop_event.is_set)
            if size:
                self.stats["bytes_pushed"] += size
                self.stats["fragments_pushed"] += 1
        except Exception as exc:
            self.stats["last_error"] = f"cannot push fragment: {exc}"
            log.error(self.stats["last_error"])


@ray.remote
class RolloutWorker:
    """The Ray boundary around a RolloutLoop running in a thread of the actor process. It is created
    without a session (so a spare can start, and import torch, before one exists); start() gives it one."""

    def __init__(self):
        self.loop: RolloutLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self, worker_index: int, joined: Joined, redis_url: str, node_id: str) -> bool:
        self.loop = RolloutLoop(worker_index, joined, redis_url, node_id)
        self.thread = threading.Thread(target=self.loop.run, name="rollout-loop", daemon=True)
        self.thread.start()
        return True

    def status(self) -> dict:
        return {**self.loop.stats, "running": self.thread.is_alive()}

    def stop(self) -> dict:
        self.loop.stop_event.set()
        self.thread.join(timeout=30)
        return dict(self.loop.stats)
