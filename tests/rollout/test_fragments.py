"""Fragment cutting follows MineStudio's alignment (reference §3.2 / §4.1)."""

import numpy as np

from services.rollout.fragments import FragmentCutter, Step


def step(t, done_before=False, state=None, version=0):
    return Step(obs={"x": np.array([t], dtype=np.float32)}, state=state, action=np.array(t), logp=-float(t),
                last_reward=10.0 + t, last_terminated=done_before, last_truncated=False, version=version)


def test_alignment_of_rewards_dones_and_next_obs():
    cutter = FragmentCutter("s", "slot", 4)
    out = [cutter.add(step(t, done_before=(t in (0, 3)), state=[np.zeros((1, 2))] if cutter.needs_state() else None))
           for t in range(5)]
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
        state = [np.full((1, 1), t)] if cutter.needs_state() else None
        f = cutter.add(step(t, state=state, version=t // 4))
        if f:
            fragments.append(f)
    assert [int(f.obs["x"][0, 0]) for f in fragments] == [0, 3, 6]
    assert [int(f.in_state[0][0, 0]) for f in fragments] == [0, 3, 6]
    assert [f.seq for f in fragments] == [0, 1, 2]
    assert fragments[1].version_first == 0 and fragments[1].model_version.tolist() == [0, 1, 1]


def test_a_dropped_buffer_marks_the_next_fragment_discontinuous():
    cutter = FragmentCutter("s", "slot", 2)
    for t in range(3):
        cutter.add(step(t, state=[np.zeros(1)] if cutter.needs_state() else None))
    assert cutter.drop() == 1
    out = [cutter.add(step(t, state=[np.zeros(1)] if cutter.needs_state() else None)) for t in range(3)]
    assert out[2].contiguous is False and out[2].seq == 1
