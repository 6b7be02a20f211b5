"""RolloutLoop: what a RolloutWorker actor runs. It owns num_envs env subprocesses, batches inference over
whichever envs are ready, cuts fragments and pushes them to the session's Redis stream. A plain class: the
actor (services/rollout/manager.py, a module without torch) adds only the Ray boundary.

The loop never busy-waits: it blocks on the env pipes and runs a batch as soon as batch_size observations
are waiting, or BATCH_DEADLINE after the first one, so a slow or restarting env never stalls the others; and
it waits that long only while waiting pays (see _wait_pays).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import wait

import numpy as np
import torch

from services.rollout.envs import EnvGroup, EnvProcess, EnvStep, Fatal, close_all
from services.rollout.fragments import FragmentCutter, Fragments, Step, cut
from services.rollout.sender import Ack, Sender, SenderGone, Settings
from services.shared.config import stream_bound
from services.shared.episode import Episode
from services.shared.fragment import signature
from services.shared.redis_server import connect
from services.shared.session import Joined
from services.shared.trees import stack, tree_map, unstack
from services.shared.weights import WeightWatcher, initial_policy

log = logging.getLogger(__name__)

# Seconds to wait for a fuller batch once one observation is ready. Every env in the batch waits this long
# for its action: at 5 ms, 8 Minecraft-paced envs (50 ms steps) reached 0.89 of their own speed, at 1 ms 0.93,
# not waiting at all 0.96. Envs that answer together (fast steps, one env per process) fill a batch within
# it; envs whose answers come milliseconds apart (Minecraft's uneven ticks) seldom do: the loop measures what
# its waits catch and waits only while they catch at least WAIT_PAYS observations on average, trying one wait
# in PROBE_EVERY all the same so that it notices when they would again.
BATCH_DEADLINE = 0.001
WAIT_PAYS = 0.5
PROBE_EVERY = 16
SENDER_RESTART_PAUSE = 1.0  # seconds between restarts of a sender process that keeps dying
RECORDS_EVERY = 0.05        # seconds: episode records wait at most this long for the next message to the sender


def check_weights(policy: torch.nn.Module, state: dict) -> None:
    """Refuse a state dict whose keys or shapes differ, before any parameter is touched."""
    own = policy.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")


def one_step(policy, device: torch.device, observations: list, states: list, first: list[bool]):
    """The policy (its parameters on device) on one time step of several envs: their (B,) observations as
    (B, 1, ...) tensors, their states merged; returns (latents, state_out)."""
    obs = tree_map(lambda a: torch.as_tensor(a[:, None], device=device), stack(observations))
    context = {"first": torch.from_numpy(np.array(first)[:, None]).to(device)}
    return policy(obs, policy.merge_state(states), context=context)


def values(policy, latents: dict, use_normalized_vf: bool) -> np.ndarray:
    """V of each env of a one_step batch, in the return scale."""
    v = latents["vpred"].reshape(-1, 1)
    if use_normalized_vf:
        v = policy.value_head.denormalize(v)
    return v.reshape(-1).cpu().numpy()


@dataclass
class _Slot:
    """One env slot of a worker: where its steps go (its fragment cutter), the recurrent state its next
    action starts from, its env's answer while that waits for an action, and the video to ask it for."""
    index: int                  # its number in the worker
    id: str                     # {node}-w{worker}-e{env}: unique in the session
    process: int                # the env process (or in-thread group) that steps it
    cutter: FragmentCutter
    state: object
    waiting: EnvStep | None = None
    video: str | None = None    # a path: record this env's next episode there


class RolloutLoop:
    """Steps one worker's envs until stop is set: collect the envs' answers into a batch, take new weights
    if a version arrived, act on the batch (inference, fragments cut, actions sent). `stats` is read by
    status calls from other threads."""

    def __init__(self, worker_index: int, joined: Joined, redis_url: str, node_id: str,
                 sender: Sender | None = None):
        self.index, self.session_id, self.redis_url = worker_index, joined.session_id, redis_url
        self.source, self.cfg, self.node_id = joined.source, joined.cfg, node_id
        # Run here, not in the loop's thread: a module that cannot run on this node fails the Start that asked.
        self.module = self.source.load()
        self.stats = {"env_steps": 0, "fragments_pushed": 0, "bytes_pushed": 0, "episodes": 0,
                      "env_restarts": 0, "env_timeouts": 0, "steps_dropped": 0, "model_version": 0,
                      "live_envs": 0, "inference_ms": 0.0, "videos": 0, "malformed_obs": 0, "last_error": "",
                      "fatal": False}  # fatal: no env of this worker can be built (a config error, not a crash)
        self.stop_event = threading.Event()
        self.spare_sender = sender  # started beforehand by a warm actor

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.stats["last_error"] = traceback.format_exc(limit=5)
            log.error("rollout worker %d failed:\n%s", self.index, self.stats["last_error"])

    def _run(self) -> None:
        rc, wc = self.cfg.rollout_config, self.cfg.rollout_config.worker_config
        self.policy = initial_policy(self.module, self.cfg)  # version 0, as the learner's
        self.policy.eval()
        self.device = self.policy.device  # a property that walks the parameters: once, not every batch
        self.version, self.watcher_error = 0, ""
        self.watcher = WeightWatcher(connect(self.redis_url), self.session_id).start()
        # The sender process pushes what each batch cut or ended (services/rollout/sender.py): the fragments of a
        # batch together, in one round trip (a worker's envs finish their fragments in the same step). The
        # backpressure: while the stream is full, the envs step on only while at most to_send_queue_size
        # fragments are with the sender (see _wait_for_room).
        # Episode records never wait (a CartPole worker ends hundreds of episodes a second); they are bounded
        # all the same: each needs a step, and steps stop with the fragments.
        self.sender_settings = Settings(self.redis_url, self.session_id, stream_bound(self.cfg), self.node_id)
        self.sender = (self.spare_sender or Sender()).configure(self.sender_settings)
        self.sender_started, self.held = time.monotonic(), 0  # held: fragments with the sender not acknowledged
        self.stream_full = False  # the sender's last word: it waits for room in the stream
        self.records: list[Episode] = []  # finished episodes not yet sent
        self.records_sent = time.monotonic()
        self.procs = self._start_envs(wc)
        slot_id = f"{self.node_id}-w{self.index}-e{{}}".format
        self.slots = [_Slot(i, slot_id(i), p, FragmentCutter(self.session_id, slot_id(i), rc.fragment_length),
                            self.policy.initial_state(1)) for p, proc in enumerate(self.procs) for i in proc.slots]
        self.proc_slots = [[self.slots[i] for i in proc.slots] for proc in self.procs]  # a process keeps its slots
        self.broken: set[int] = set()   # processes whose env cannot be built: reported, not respawned
        # See _wait_pays: the loop waits until its waits are seen not to pay; batches that could have waited
        # for more, and those that did.
        self.wait_caught, self.wait_chances, self.waits_taken = 1.0, 0, 0
        self.obs_signature = None       # structure, dtypes and shapes of the first observation seen
        self.stats["live_envs"] = wc.num_envs
        self.acks_seen = time.monotonic()  # when the sender's pipe was last looked at
        try:
            # Inference mode once for the whole loop, not per batch (entering it costs ~3 us of a CartPole batch's
            # ~250); new weights are copied into the parameters in place, which it allows.
            with torch.inference_mode():
                while not self.stop_event.is_set():
                    if len(self.broken) == len(self.procs):
                        self.stats["fatal"] = True
                        break  # nothing can run; last_error says why
                    batch = self._collect(min(wc.batch_size, wc.num_envs))
                    if batch:
                        steps = self._record(batch)
                        self._take_weights()
                        self._act(batch, steps)
                        if self.held or time.monotonic() - self.acks_seen > RECORDS_EVERY:
                            self._take_acks()
        finally:
            if self.records:
                self._send(None)
            for ack in self.sender.finish(timeout=10):
                self._acked(ack)
            self.watcher.stop()
            close_all(self.procs, timeout=2)
            self.stats["live_envs"] = 0

    def _start_envs(self, wc) -> list:
        """The env processes (or, with envs_per_process 0, one group stepped in this thread)."""
        seed = (self.cfg.seed * 100_003 + self.index * 1009 + os.getpid()) % (2 ** 31)
        discount, k = self.cfg.train_config.discount, wc.envs_per_process
        if k == 0:  # every env in this thread: no process, no pipe
            return [EnvGroup(list(range(wc.num_envs)), self.source, [seed + i for i in range(wc.num_envs)], discount,
                             wc.restart_interval, wc.video_fps)]
        return [EnvProcess(list(range(first, min(first + k, wc.num_envs))), self.source,
                           [seed + i for i in range(first, min(first + k, wc.num_envs))], discount,
                           wc.restart_interval, wc.video_fps, wc.env_timeout, wc.env_start_timeout)
                for first in range(0, wc.num_envs, k)]

    # -- collect: the envs' answers, until a batch is ready ---------------------------------------------
    def _collect(self, target: int) -> list[_Slot]:
        """Wait on the env pipes until `target` slots have an answer, or BATCH_DEADLINE after the first one
        (a slow or restarting env never holds the others back); returns the batch, or [] on a stop."""
        deadline, before = 0.0, None  # before: the observations there when a wait for more began
        while not self.stop_event.is_set():
            waiting = [s for s in self.slots if s.waiting is not None]
            idle = [p for p in range(len(self.procs)) if p not in self.broken and
                    self.slots_of(p)[0].waiting is None]
            if len(waiting) >= target or (waiting and not idle) or (waiting and deadline and
                                                                    time.monotonic() >= deadline):
                if before is not None:
                    self.wait_caught += 0.1 * (len(waiting) - before - self.wait_caught)
                return waiting
            if waiting and not deadline:  # the first answers of a batch that has room and more to come
                if not self._wait_pays():
                    return waiting
                deadline, before = time.monotonic() + BATCH_DEADLINE, len(waiting)
            if len(self.broken) == len(self.procs):
                return []
            ready = [p for p in idle if self.procs[p].conn is None]  # in-thread envs have answered already
            conns = {self.procs[p].conn: p for p in idle if self.procs[p].conn is not None}
            timeout = 0.0 if ready else max(0.0, deadline - time.monotonic()) if waiting else 0.5
            if conns:
                ready += [conns[conn] for conn in wait(list(conns), timeout=timeout)]
            for p in ready:
                self._receive(p)
            now = time.monotonic()
            for p in idle:
                if p not in self.broken and self.slots_of(p)[0].waiting is None and now > self.procs[p].deadline:
                    self.stats["env_timeouts"] += 1
                    self._restart(p, "no answer within worker_config.env_timeout / env_start_timeout")
        return []

    def _wait_pays(self) -> bool:
        """Whether to wait BATCH_DEADLINE for a fuller batch: while recent waits caught WAIT_PAYS observations
        on average (wait_caught, their moving average), and once in PROBE_EVERY batches regardless. Asked only
        of a batch with room and an env still to answer: one already full, or with every answer it can get, is
        taken at once and is no wait to judge."""
        self.wait_chances += 1
        wait = self.wait_caught >= WAIT_PAYS or self.wait_chances % PROBE_EVERY == 0
        self.waits_taken += wait
        return wait

    def slots_of(self, p: int) -> list[_Slot]:
        return self.proc_slots[p]

    def _receive(self, p: int) -> None:
        """Take env process p's answer for each of its slots; a dead process, an env that cannot be built and
        a malformed observation are handled here."""
        try:
            answer = self.procs[p].recv()
        except (EOFError, OSError):
            self._restart(p, "env process died")
            return
        if isinstance(answer, Fatal):  # its env cannot be built at all
            self.stats["last_error"] = f"env {self.procs[p].slots[0]}: {answer.reason}"
            log.error(self.stats["last_error"])
            self.broken.add(p)
            self.stats["live_envs"] -= len(self.procs[p].slots)
            return
        malformed = set()
        for slot, step in zip(self.slots_of(p), answer):
            if step.restarted:  # the env rebuilt itself after an exception
                self.stats["env_restarts"] += 1
                self.stats["steps_dropped"] += slot.cutter.drop()
            shape = signature(step.obs)
            self.obs_signature = self.obs_signature or shape
            if shape != self.obs_signature:
                malformed.add(shape)
            if step.final_obs is not None and signature(step.final_obs) != shape:
                self.stats["malformed_obs"] += 1  # not bootstrapped: the cut counts as an end
                step = step._replace(final_obs=None)
            slot.waiting = step
        if malformed:
            self.stats["malformed_obs"] += 1
            self._restart(p, f"malformed observation {malformed}, expected {self.obs_signature}")

    def _restart(self, p: int, why: str) -> None:
        """Respawn env process p; every slot it steps loses its partial fragment."""
        log.warning("env process %d (envs %s) of worker %d: %s; restarting it", p, self.procs[p].slots, self.index,
                    why)
        self.stats["env_restarts"] += 1
        for slot in self.slots_of(p):
            self.stats["steps_dropped"] += slot.cutter.drop()
            slot.waiting, slot.state = None, self.policy.initial_state(1)
        self.procs[p].restart()

    # -- take weights: a new version between two batches ------------------------------------------------
    def _take_weights(self) -> None:
        watcher = self.watcher
        ready = watcher.take()
        if watcher.last_error != self.watcher_error:  # a new trouble of the watcher (Redis away, a bad version)
            self.watcher_error = self.stats["last_error"] = watcher.last_error
        if ready is None:
            return
        version, state = ready
        try:
            check_weights(self.policy, state)
        except ValueError as exc:
            self.stats["last_error"] = f"kept version {self.version}: cannot load version {version}: {exc}"
            log.error(self.stats["last_error"])
            return
        self.policy.load_state_dict(state)
        self.version = self.stats["model_version"] = version
        tc, wc = self.cfg.train_config, self.cfg.rollout_config.worker_config
        if tc.record_video_interval and version % tc.record_video_interval == 0:
            for slot in self.slots[:wc.videos_per_worker]:
                slot.video = os.path.join(wc.video_output_dir, self.session_id, f"v{version:06d}-{slot.id}.mp4")

    # -- record: the batch's observations into the fragments, those complete sent -----------------------
    def _record(self, batch: list[_Slot]) -> list[EnvStep]:
        """Append each slot's new observation to its fragment and hand the fragments it completes to the
        sender, then wait while the stream has no room for them (_wait_for_room). All before the batch is
        acted on: a completed fragment needs its last observation, not the action on it, and that action is
        step 0 of the slot's next fragment. Chosen after the wait, with the weights the trainer published
        meanwhile, it does not make the next fragment a version older than the rest of its steps (stale, and
        dropped, an iteration sooner)."""
        policy, max_staleness = self.policy, self.cfg.rollout_config.replay_buffer_config.max_staleness
        steps = [slot.waiting for slot in batch]
        for slot in batch:
            slot.waiting = None
        cut_values = truncation_values(policy, self.device, [s.final_obs for s in steps],
                                       [slot.state for slot in batch], self.cfg.train_config.use_normalized_vf)
        ready: list[FragmentCutter] = []  # the slots whose fragment this observation completes
        for slot, step, cut_value in zip(batch, steps, cut_values):
            if step.last_terminated or step.last_truncated:  # a new episode: fresh recurrent state
                slot.state = policy.initial_state(1)
            if step.finished is not None:
                self._episode(step.finished, slot.id)
            cutter = slot.cutter
            if cutter.buffer and self.version - cutter.buffer[0].version > max_staleness:
                self.stats["steps_dropped"] += cutter.drop()
            if cutter.add(Step(step.obs, None, None, 0.0, step.last_reward, step.last_terminated,
                               step.last_truncated, self.version, last_truncation_value=cut_value)):
                ready.append(cutter)
        if ready or (self.records and time.monotonic() - self.records_sent > RECORDS_EVERY):
            self._send(cut(ready) if ready else None)
        self._wait_for_room()
        return steps

    # -- act: inference on the batch, actions recorded and sent ------------------------------------------
    def _act(self, batch: list[_Slot], steps: list[EnvStep]) -> None:
        policy = self.policy
        started = time.perf_counter()
        latents, state_out = one_step(policy, self.device, [s.obs for s in steps], [slot.state for slot in batch],
                                      [s.last_terminated or s.last_truncated for s in steps])
        action = policy.pi_head.sample(latents["pi_logits"])
        logp = policy.pi_head.logprob(action, latents["pi_logits"]).reshape(-1).cpu().numpy()
        new_states = policy.split_state(state_out, len(batch))
        actions = tree_map(lambda t: t.detach().cpu().numpy(), action)
        self.stats["inference_ms"] = 0.9 * self.stats["inference_ms"] + 0.1 * 1000 * (time.perf_counter() - started)
        chosen: dict[int, tuple] = {}  # slot index -> (action, video path) to send to its process
        acts = unstack(tree_map(lambda a: a[:, 0], actions), len(batch))  # each env's action at its one time step
        for slot, act, act_logp, state in zip(batch, acts, logp.tolist(), new_states):
            record = slot.cutter.buffer[-1]  # the step _record appended
            record.action, record.logp, record.version = act, act_logp, self.version
            if slot.cutter.starts_fragment():
                record.state = tree_map(lambda t: t.detach().cpu().numpy(), slot.state)
            slot.state = state
            chosen[slot.index] = (act, slot.video)
            slot.video = None
        for p in sorted({slot.process for slot in batch}):
            try:
                self.procs[p].send([chosen.pop(i) for i in self.procs[p].slots])
            except (BrokenPipeError, OSError):
                self._restart(p, "env process died")
        self.stats["env_steps"] += len(batch)
        self._wait_for_sender()

    def _episode(self, finished: Episode, slot_id: str) -> None:
        self.stats["episodes"] += 1
        self.stats["videos"] += bool(finished.video)
        self.records.append(replace(finished, version=self.version, slot=slot_id, worker=self.index))

    # -- send: to the sender process ---------------------------------------------------------------------
    def _send(self, fragments: Fragments | None) -> None:
        """Hand a batch's fragments (all together: pushed in one round trip) and the records to the sender."""
        records, self.records, self.records_sent = self.records, [], time.monotonic()
        count = len(fragments) if fragments is not None else 0
        try:
            self.sender.send((fragments, records))
            self.held += count
        except SenderGone as exc:
            self._sender_gone(exc, count)

    def _wait_for_room(self) -> None:
        """The backpressure: while the stream is full, the envs step on only while at most
        to_send_queue_size fragments are with the sender. A stop does not wait. Checked before the batch is
        acted on (see _record)."""
        bound = self.cfg.rollout_config.to_send_queue_size
        while self.held > bound and self.stream_full and not self.stop_event.is_set():
            self._take_acks(timeout=0.05)

    def _wait_for_sender(self) -> None:
        """While the stream has room, the envs step on only while at most one batch's more fragments than
        to_send_queue_size are with the sender. Checked once the batch's actions are sent, so the sender's
        round trip overlaps the envs' step."""
        bound = self.cfg.rollout_config.to_send_queue_size + len(self.slots)
        while self.held > bound and not self.stop_event.is_set():
            self._take_acks(timeout=0.05)

    def _take_acks(self, timeout: float = 0.0) -> None:
        """The sender's acks. Looked for after every batch while it holds fragments, otherwise every
        RECORDS_EVERY (an error writing episode records); a sender that died holding nothing is found by the
        next send."""
        self.acks_seen = time.monotonic()
        try:
            for ack in self.sender.acks(timeout):
                self._acked(ack)
        except SenderGone as exc:
            self._sender_gone(exc, 0)

    def _acked(self, ack: Ack) -> None:
        self.held -= ack.done
        self.stream_full = ack.full
        self.stats["fragments_pushed"] += ack.pushed
        self.stats["bytes_pushed"] += ack.bytes
        if ack.error:
            self.stats["last_error"] = ack.error

    def _sender_gone(self, exc: SenderGone, unsent: int) -> None:
        """Start a new sender process; the fragments the old one held, never produced, are dropped steps."""
        lost = self.held + unsent
        self.stats["steps_dropped"] += lost * self.cfg.rollout_config.fragment_length
        self.stats["last_error"] = f"{exc}; {lost} fragments lost, restarting it"
        log.error(self.stats["last_error"])
        self.sender.close()
        if time.monotonic() - self.sender_started < SENDER_RESTART_PAUSE:
            time.sleep(SENDER_RESTART_PAUSE)  # one that dies at once must not be restarted in a tight loop
        self.held, self.stream_full = 0, False
        self.sender, self.sender_started = Sender().configure(self.sender_settings), time.monotonic()


def truncation_values(policy, device: torch.device, final_obs: list, states: list,
                      use_normalized_vf: bool) -> list[float]:
    """V(final obs) for each env whose episode a time limit just cut, from the recurrent state that
    observation continues (the behaviour policy's value: the learner never sees that observation), so GAE can
    bootstrap the cut instead of treating it as a real end; 0.0 for the others. Called in inference mode."""
    out = [0.0] * len(final_obs)
    cut = [j for j, o in enumerate(final_obs) if o is not None]
    if not cut:
        return out
    latents, _ = one_step(policy, device, [final_obs[j] for j in cut], [states[j] for j in cut], [False] * len(cut))
    for j, x in zip(cut, values(policy, latents, use_normalized_vf).tolist()):
        out[j] = x
    return out
