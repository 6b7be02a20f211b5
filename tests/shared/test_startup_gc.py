"""A process of mso's defers cyclic garbage collection while it starts (services.shared.startup_gc), then collects
as usual; a child forked meanwhile collects from its start; a program that turned collection off keeps it off.
Each case runs in a cold interpreter, as an entry point does."""

import subprocess
import sys
import textwrap


def run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_collection_is_deferred_for_the_window_then_resumes():
    started, deferred, resumed, elapsed = run("""
        import gc, time
        from services.shared import startup_gc
        started = gc.isenabled()
        t0 = time.monotonic()
        startup_gc.defer(0.5)
        deferred = gc.isenabled()
        while not gc.isenabled() and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        print(started, deferred, gc.isenabled(), time.monotonic() - t0)
    """)
    assert (started, deferred, resumed) == ("True", "False", "True")
    assert 0.5 <= float(elapsed) < 30


def test_a_child_forked_during_the_deferral_collects_from_its_start():
    parent, child = run("""
        import gc, os
        from services.shared import startup_gc
        startup_gc.defer(60)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, str(gc.isenabled()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(gc.isenabled(), os.read(r, 10).decode())
    """)
    assert (parent, child) == ("False", "True")


def test_collection_the_program_turned_off_stays_off():
    enabled, timers = run("""
        import gc, threading
        from services.shared import startup_gc
        gc.disable()
        before = threading.active_count()
        startup_gc.defer(0.01)
        print(gc.isenabled(), threading.active_count() - before)  # no timer: nothing will turn it on
    """)
    assert (enabled, timers) == ("False", "0")


def test_the_mso_command_defers_collection_while_it_starts():
    enabled, = run("""
        import contextlib, gc, io
        from services import cli
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["config", "cartpole"]) == 0
        print(gc.isenabled())
    """)
    assert enabled == "False"
