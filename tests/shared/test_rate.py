"""The env steps/s users read holds still for a steady rate counted a fragment batch at a time, and a counter
that starts again (a new session, a restarted service) reads as a new counter, never as a negative rate."""

from services.shared.rate import WINDOW, Rate


def steady_counter(steps_per_s: float, batch: int, seconds: float, every: float = 0.5):
    """(when, count) read every `every` seconds of a counter that moves `batch` steps at a time at steps_per_s."""
    t, out = 0.0, []
    while t <= seconds:
        out.append((t, batch * int(t * steps_per_s / batch)))
        t += every
    return out


def test_a_steady_rate_counted_in_batches_reads_steady_after_one_window():
    # Crafter's built-in config: 512 env steps a batch of fragments at ~500 steps/s, read twice a second (as mso
    # run's progress line does). Over the last second alone this read 0, 510 or 1020.
    rate = Rate()
    readings = [(t, rate.update(count, now=t)) for t, count in steady_counter(500, 512, 60)]
    after = [r for t, r in readings if t >= WINDOW]
    assert all(abs(r - 500) <= 0.11 * 500 for r in after), sorted(set(round(r) for r in after))
    assert all(r == 0 for t, r in readings if t < 1.0)


def test_it_follows_a_change_of_rate_within_a_window():
    rate = Rate()
    for t, count in steady_counter(500, 64, 30):
        rate.update(count, now=t)
    for t, count in steady_counter(2000, 64, 30):
        reading = rate.update(count + 15_000, now=30 + t)
    assert abs(reading - 2000) <= 0.05 * 2000


def test_a_counter_that_goes_back_is_a_new_counter_not_a_negative_rate():
    rate = Rate()
    for t, count in steady_counter(500, 64, 20):
        rate.update(count, now=t)
    readings = [rate.update(count, now=20 + t) for t, count in steady_counter(300, 64, 20)]
    assert min(readings) >= 0
    assert abs(readings[-1] - 300) <= 0.05 * 300
