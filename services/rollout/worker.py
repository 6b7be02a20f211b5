"""RolloutWorker: a Ray actor that owns num_envs env subprocesses, batches inference over whichever envs
are ready, cuts fragments and pushes them to the session's Redis stream.

The loop never busy-waits: it blocks on the env pipes and runs a batch as soon as batch_size observations
are waiting, or after a short deadline with at least one, so a slow env never stalls the others.
"""

from __future__ import annotations

import logging
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

from mso import keys
from mso.config import from_yaml, import_module
from mso.queue import FragmentProducer
from mso.redis_server import connect
from mso.rollout.envs import EnvSlot
from mso.rollout.fragments import FragmentCutter, Step
from mso.weights import WeightWatcher

log = logging.getLogger(__name__)

BATCH_DEADLINE = 0.005  # seconds to wait for a fuller batch once one observation is ready
EPISODES_KEPT = 10_000  # entries the episode stream keeps


def to_tensor_tree(tree, device):
    if isinstance(tree, dict):
        return {k: to_tensor_tree(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_tensor_tree(v, device) for v in tree]
    return torch.as_tensor(np.asarray(tree), device=device)


def to_numpy_tree(tree):
    if isinstance(tree, dict):
        return {k: to_numpy_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_numpy_tree(v) for v in tree]
    return tree.detach().cpu().numpy()


def index_tree(tree, i):
    if isinstance(tree, dict):
        return {k: index_tree(v, i) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [index_tree(v, i) for v in tree]
    return tree[i]


def stack_obs(obs_list: list):
    """(B,) list of obs trees -> tree of (B,1,...) arrays: one time step per env."""
    first = obs_list[0]
    if isinstance(first, dict):
        return {k: stack_obs([o[k] for o in obs_list]) for k in first}
    return np.stack([np.asarray(o) for o in obs_list])[:, None]


@ray.remote
class RolloutWorker:
    def __init__(self, worker_index: int, session_id: str, redis_url: str, config_name: str, config_yaml: str):
        self.index = worker_index
        self.session_id = session_id
        self.redis_url = redis_url
        self.config_name = config_name
        self.cfg = from_yaml(config_yaml)
        self.stats = {"env_steps": 0, "fragments_pushed": 0, "episodes": 0, "env_restarts": 0,
                      "steps_dropped": 0, "model_version": 0, "live_envs": 0, "last_error": ""}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        self._thread = threading.Thread(target=self._run_guarded, name="rollout-loop", daemon=True)
        self._thread.start()
        return True

    def status(self) -> dict:
        return dict(self.stats)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return dict(self.stats)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception:
            self.stats["last_error"] = traceback.format_exc(limit=5)
            log.error("rollout worker %d failed:\n%s", self.index, self.stats["last_error"])

    def _run(self) -> None:
        rc, wc = self.cfg.rollout_config, self.cfg.rollout_config.worker_config
        client = connect(self.redis_url)
        sk = keys.SessionKeys(self.session_id)
        module = import_module(self.config_name)
        torch.manual_seed(self.cfg.seed)
        policy = module.policy_generator()
        policy.eval()
        device = policy.device
        use_normalized_vf = self.cfg.train_config.use_normalized_vf
        max_staleness = rc.replay_buffer_config.max_staleness
        version = 0
        watcher = WeightWatcher(connect(self.redis_url), self.session_id).start()

        producer = FragmentProducer(client, self.session_id, rc.max_pending_fragments)
        outbox: queue.Queue = queue.Queue(maxsize=rc.to_send_queue_size)
        sender = threading.Thread(target=self._send_loop, args=(producer, outbox), name="sender", daemon=True)
        sender.start()

        node = uuid.uuid4().hex[:8]
        base_seed = self.cfg.seed * 100_003 + self.index * 1009 + int(time.time()) % 100_000
        slots = [EnvSlot(i, self.config_name, base_seed + i) for i in range(wc.num_envs)]
        cutters = [FragmentCutter(self.session_id, f"{node}-w{self.index}-e{i}", rc.fragment_length)
                   for i in range(wc.num_envs)]
        states = [policy.initial_state(1) for _ in slots]
        episode_ids = [uuid.uuid4().hex for _ in slots]
        pending: dict[int, tuple] = {}
        target = min(wc.batch_size, len(slots))
        deadline = 0.0
        self.stats["live_envs"] = len(slots)
        try:
            while not self._stop.is_set():
                waiting = {slots[i].conn: i for i in range(len(slots)) if i not in pending}
                if waiting and len(pending) < target:
                    timeout = max(0.0, deadline - time.monotonic()) if pending else 0.5
                    for conn in wait(list(waiting), timeout=timeout):
                        i = waiting[conn]
                        try:
                            pending[i] = conn.recv()
                        except (EOFError, OSError):
                            self._restart(slots[i], cutters[i], "env process died")
                            states[i] = policy.initial_state(1)
                            continue
                        if pending[i][5]:  # the env rebuilt itself after an error
                            self.stats["env_restarts"] += 1
                            self.stats["steps_dropped"] += cutters[i].drop()
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
                        policy.load_state_dict(ready[1])
                        version = ready[0]
                    except (RuntimeError, KeyError) as exc:
                        self.stats["last_error"] = f"cannot load weights version {ready[0]}: {exc}"
                    self.stats["model_version"] = version

                batch = sorted(pending)
                msgs = [pending.pop(i) for i in batch]
                for i, msg in zip(batch, msgs):
                    if msg[2] or msg[3]:  # a new episode: fresh recurrent state
                        states[i] = policy.initial_state(1)
                        episode_ids[i] = uuid.uuid4().hex
                    if msg[4] is not None:
                        self._episode(client, sk, msg[4], version)
                with torch.inference_mode():
                    obs = to_tensor_tree(stack_obs([m[0] for m in msgs]), device)
                    state_in = policy.merge_state([states[i] for i in batch])
                    first = torch.tensor([[bool(m[2] or m[3])] for m in msgs], device=device)
                    latents, state_out = policy(obs, state_in, context={"first": first})
                    action = policy.pi_head.sample(latents["pi_logits"])
                    logp = policy.pi_head.logprob(action, latents["pi_logits"]).reshape(-1).cpu().numpy()
                    vpred = latents["vpred"].reshape(-1, 1)
                    if use_normalized_vf:
                        vpred = policy.value_head.denormalize(vpred)
                    vpred = vpred.reshape(-1).cpu().numpy()
                    new_states = policy.split_state(state_out, len(batch))
                actions = to_numpy_tree(action)
                for j, i in enumerate(batch):
                    obs_i, last_reward, terminated, truncated = msgs[j][:4]
                    act = index_tree(actions, j)  # (1, ...) : one time step
                    cutter = cutters[i]
                    if cutter.buffer and version - cutter.buffer[0].version > max_staleness:
                        self.stats["steps_dropped"] += cutter.drop()
                    state_np = to_numpy_tree(states[i]) if cutter.needs_state() else None
                    fragment = cutter.add(Step(obs_i, state_np, index_tree(act, 0), float(logp[j]),
                                               float(vpred[j]), float(last_reward), bool(terminated),
                                               bool(truncated), version, episode_ids[i]))
                    states[i] = new_states[j]
                    try:
                        slots[i].conn.send(index_tree(act, 0))
                    except (BrokenPipeError, OSError):
                        self._restart(slots[i], cutter, "env process died")
                        states[i] = policy.initial_state(1)
                    if fragment is not None:
                        outbox.put(fragment)  # blocks when the sender is behind: backpressure
                self.stats["env_steps"] += len(batch)
        finally:
            outbox.put(None)
            sender.join(timeout=10)
            watcher.stop()
            for slot in slots:
                slot.close(timeout=2)
            self.stats["live_envs"] = 0

    def _restart(self, slot: EnvSlot, cutter: FragmentCutter, why: str) -> None:
        log.warning("env %d of worker %d: %s; restarting it", slot.index, self.index, why)
        self.stats["env_restarts"] += 1
        self.stats["steps_dropped"] += cutter.drop()
        slot.restart()

    def _episode(self, client, sk: keys.SessionKeys, episode: dict, version: int) -> None:
        self.stats["episodes"] += 1
        record = {"return": episode["return"], "length": episode["length"], "version": version,
                  "worker": self.index}
        pipe = client.pipeline(transaction=False)
        pipe.xadd(sk.episodes, {b"e": msgpack.packb(record)}, maxlen=EPISODES_KEPT, approximate=True)
        pipe.hincrby(sk.ledger, "episodes", 1)
        pipe.execute()

    def _send_loop(self, producer: FragmentProducer, outbox: queue.Queue) -> None:
        while True:
            fragment = outbox.get()
            if fragment is None:
                return
            try:
                producer.wait_for_room(should_stop=self._stop.is_set)
                if self._stop.is_set():
                    continue
                producer.push(fragment, env_steps=len(fragment["reward"]))
                self.stats["fragments_pushed"] += 1
            except Exception as exc:
                self.stats["last_error"] = f"cannot push fragment: {exc}"
                log.error(self.stats["last_error"])
