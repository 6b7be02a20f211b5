"""The sender: a process beside each rollout worker that appends the worker's fragments and episode records
to the session's Redis streams. A process, not a thread of the worker: as a thread it shared the worker's
GIL, and every torch op of the worker's inference hands the GIL to a waiting thread, so a CartPole worker's
inference took twice as long (500 against 260 us a batch) whenever the sender was busy encoding or talking
to Redis (benchmarks/README, measure 2). The process imports no torch: it starts in a fraction of a second.

Worker -> sender, over one pipe: first Settings, then (Fragments or None, episodes) per batch that cut
fragments or ended episodes (rollout/fragments.py: a batch's fragments stacked, split here), then None:
push what the stream has room for now, and exit. The pipe's end (the worker died) means the same.
Sender -> worker: an Ack after each round trip that appended fragments or found the stream newly full, and
one for those it gave up or failed to push. `done` counts the fragments the sender is finished with; `full`
says the stream has no room (its last round trip filled it, or found it full), which is when the worker's
to_send_queue_size applies. Episode records are written first and never wait; fragments wait while the
stream is full.
"""

from __future__ import annotations

if __name__ == "__main__":  # the sender's process, before it imports redis-py and numpy
    from services.shared import startup_gc

    startup_gc.defer()

import logging
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Pipe
from typing import NamedTuple

from services.shared import episode
from services.shared.episode import Episode
from services.shared.fragment import Fragment
from services.shared.queue import FragmentProducer
from services.shared.redis_server import connect

log = logging.getLogger(__name__)


class Settings(NamedTuple):
    redis_url: str          # sent down the pipe, not on the command line: it may hold a password
    session_id: str
    max_pending: int        # the stream's bound (config.stream_bound)
    node_id: str


class Ack(NamedTuple):
    done: int               # fragments finished with: pushed, or not produced because the worker is finishing
    pushed: int
    bytes: int
    full: bool = False      # the stream is full: it refused some of them, or has no room left after them
    error: str = ""         # what went wrong in this round, if anything


class SenderGone(ConnectionError):
    """The sender process died (or could not start); the fragments it held were lost, never half-written."""


class Sender:
    """The worker's side: starts the process and talks to it. Not thread-safe: the stepping thread owns it.
    Started before it is configured, so a warm rollout worker holds one that has done its imports when a
    session comes (~0.35 s that the first fragment would otherwise wait for)."""

    def __init__(self):
        conn, child = Pipe(duplex=True)
        self.process = subprocess.Popen([sys.executable, "-m", "services.rollout.sender", str(child.fileno())],
                                        pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self.conn = conn
        # Asked after every batch: a poll object made once costs 0.4 us a look, Connection.poll 2.5 us (it builds
        # a selector each time).
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)

    def configure(self, settings: Settings) -> Sender:
        self.send(settings)
        return self

    def send(self, message) -> None:
        try:
            # Plain pickle of our own records, in our own process tree (the pipe is the worker's and its child's
            # alone); multiprocessing's send() builds a pickler with a copied dispatch table per message.
            self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError) as exc:
            raise SenderGone(f"sender process {self.process.pid} is gone: {exc}") from None

    def acks(self, timeout: float = 0.0) -> list[Ack]:
        """The acks that arrived, waiting up to timeout for the first one."""
        out = []
        try:
            while self.poller.poll(timeout * 1000):  # readable, or closed: recv_bytes then says which
                out.append(pickle.loads(self.conn.recv_bytes()))
                timeout = 0.0
        except (OSError, EOFError) as exc:
            if out:
                return out  # its last words; the next call finds the pipe closed again
            raise SenderGone(f"sender process {self.process.pid} is gone"
                             f" (exit code {self.process.poll()}): {exc or 'pipe closed'}") from None
        return out

    def finish(self, timeout: float) -> list[Ack]:
        """Ask it to push what fits and exit; its last acks. Killed when it takes longer than timeout."""
        out, deadline = [], time.monotonic() + timeout
        try:
            self.send(None)
            while time.monotonic() < deadline:
                out += self.acks(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                if self.process.poll() is not None:
                    out += self.acks()
                    break
        except SenderGone:
            pass
        self.close()
        return out

    def close(self) -> None:
        self.conn.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _serve(conn: Connection) -> None:
    settings: Settings = pickle.loads(conn.recv_bytes())
    client = connect(settings.redis_url)
    producer = FragmentProducer(client, settings.session_id, settings.max_pending, settings.node_id)
    inbox: queue.Queue = queue.Queue()
    finishing = threading.Event()  # the worker said None or went away: stop waiting for room

    def read() -> None:  # a thread, so the pipe is read while a push waits for room
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (OSError, EOFError):
                message = None
            if message is None:
                finishing.set()
                inbox.put(None)
                return
            inbox.put(message)

    threading.Thread(target=read, name="sender-reader", daemon=True).start()
    while True:
        messages = [inbox.get()]
        while messages[-1] is not None:
            try:
                messages.append(inbox.get_nowait())
            except queue.Empty:
                break
        fragments: list[Fragment] = [f for m in messages if m is not None and m[0] is not None for f in m[0].split()]
        records: list[Episode] = [e for m in messages if m is not None for e in m[1]]
        errors = []
        if records:
            try:
                pipe = client.pipeline(transaction=False)
                episode.append(pipe, settings.session_id, records)
                pipe.execute()
            except Exception as exc:
                errors.append(f"cannot write episode statistics: {exc}")
        acked, was_full = 0, False

        def ack(sizes: list[int], full: bool, given_up: int = 0, error: str = "") -> None:
            nonlocal acked, was_full
            if not (sizes or given_up or error or full != was_full):
                return  # another round trip of a full stream: nothing new to say
            acked, was_full = acked + len(sizes) + given_up, full
            try:
                conn.send_bytes(pickle.dumps(Ack(len(sizes) + given_up, len(sizes), sum(sizes), full, error)))
            except (OSError, EOFError):
                pass  # the worker is gone; what is left in the inbox is pushed all the same

        if fragments:
            try:
                # After each round trip, so the worker knows at once when the stream is full. Finishing while it
                # is: what is not pushed is never produced; the ledger stays exact.
                producer.push_many(fragments, should_stop=finishing.is_set, each_round=ack)
            except Exception as exc:
                errors.append(f"cannot push fragments: {exc}")
        for error in errors:
            log.error(error)
        ack([], was_full, given_up=len(fragments) - acked, error="; ".join(errors))
        if messages[-1] is None:
            return


def main() -> None:
    # Ctrl-C reaches the whole process group: the worker ends the sender (None, or its pipe closing) once it has
    # stopped stepping, so the fragments it already cut are pushed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sender %(levelname)s %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    except (OSError, EOFError):
        pass  # the worker went away before saying anything
    finally:
        conn.close()
        os._exit(0)  # no interpreter teardown of daemon threads blocked in recv


if __name__ == "__main__":
    from services.rollout import sender  # its classes by their importable name: Ack must unpickle in the worker
    sender.main()
