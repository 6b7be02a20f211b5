"""Fragment cutting follows MineStudio's alignment (reference §3.2 / §4.1)."""

import numpy as np

from services.rollout.fragments import FragmentCutter, Step, cut


def step(t, done_before=False, state=None, version=0):
    return Step(obs={"x": np.array([t], dtype=np.float32)}, state=state, action=np.array(t), logp=-float(t),
                last_reward=10.0 + t, last_terminated=done_before, last_truncated=False, version=version)


def add(cutter, step, state=None):
    """Append a step as a worker does: the fragment it completes, cut alone, or None; then the in-state its
    action started from, kept when the step starts the next fragment."""
    fragment = cut([cutter]).split()[0] if cutter.add(step) else None
    if cutter.starts_fragment():
        cutter.buffer[-1].state = state
    return fragment


def test_alignment_of_rewards_dones_and_next_obs():
    cutter = FragmentCutter("s", "slot", 4)
    out = [add(cutter, step(t, done_before=(t in (0, 3))), state=[np.zeros((1, 2))]) for t in range(5)]
    assert out[:4] == [None] * 4
    f = out[4]
    np.testing.assert_array_equal(f.obs["x"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(f.reward, [11, 12, 13, 14])      # r_t arrives with step t+1
    np.testing.assert_array_equal(f.first, [True, False, False, True])
    np.testing.assert_array_equal(f.next_done, [False, False, True, False])
    assert f.next_obs["x"][0] == 4
    np.testing.assert_array_equal(f.logp, [0, -1, -2, -3])
    assert f.seq == 0 and f.contiguous and f.in_state is not None


def test_fragments_tile_the_stream_and_carry_the_in_state_of_their_first_step():
    cutter = FragmentCutter("s", "slot", 3)
    fragments = []
    for t in range(10):
        f = add(cutter, step(t, version=t // 4), state=[np.full((1, 1), t)])
        if f:
            fragments.append(f)
    assert [int(f.obs["x"][0, 0]) for f in fragments] == [0, 3, 6]
    assert [int(f.in_state[0][0, 0]) for f in fragments] == [0, 3, 6]
    assert [f.seq for f in fragments] == [0, 1, 2]
    assert fragments[1].version_first == 0 and fragments[1].model_version.tolist() == [0, 1, 1]


def test_a_dropped_buffer_marks_the_next_fragment_discontinuous():
    cutter = FragmentCutter("s", "slot", 2)
    for t in range(3):
        add(cutter, step(t), state=[np.zeros(1)])
    assert cutter.drop() == 1
    out = [add(cutter, step(t), state=[np.zeros(1)]) for t in range(3)]
    assert out[2].contiguous is False and out[2].seq == 1


def test_the_fragments_of_several_slots_cut_together_are_those_each_would_cut_alone():
    """A worker cuts the fragments its slots complete in one step together (one record to its sender); each is
    what its slot's cutter would have cut by itself: its own steps, seq, contiguity and in-state."""
    together = [FragmentCutter("s", f"slot-{i}", 3) for i in range(3)]
    alone = [FragmentCutter("s", f"slot-{i}", 3) for i in range(3)]
    together[1].drop(), alone[1].drop()  # one slot's stream broke before: its fragment is not contiguous
    cut_together, cut_alone = [], []
    for t in range(7):
        ready = []
        for i, (a, b) in enumerate(zip(together, alone)):
            if a.add(step(10 * i + t, done_before=(t == i + 1), version=t // 2)):
                ready.append(a)
            if (f := add(b, step(10 * i + t, done_before=(t == i + 1), version=t // 2),
                         state=[np.full((1, 2), 10 * i + t)])) is not None:
                cut_alone.append(f)
        if ready:
            assert len(ready) == 3  # the slots step in lockstep: all or none complete a fragment
            cut_together += cut(ready).split()
        for i, a in enumerate(together):
            if a.starts_fragment():
                a.buffer[-1].state = [np.full((1, 2), 10 * i + t)]
    assert len(cut_together) == len(cut_alone) == 6
    for a, b in zip(cut_together, cut_alone):
        assert (a.slot, a.seq, a.contiguous, a.version_first) == (b.slot, b.seq, b.contiguous, b.version_first)
        for name in ("reward", "first", "next_done", "next_truncated", "truncation_value", "logp", "model_version"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape == (3,), name
            np.testing.assert_array_equal(x, y, err_msg=name)
        for x, y in ((a.obs["x"], b.obs["x"]), (a.action, b.action), (a.next_obs["x"], b.next_obs["x"]),
                     (a.in_state[0], b.in_state[0])):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    assert [f.contiguous for f in cut_together] == [True, False, True, True, True, True]
    assert [int(f.obs["x"][0, 0]) for f in cut_together] == [0, 10, 20, 3, 13, 23]
