"""Ports chosen for a process that binds them later (mso run chooses them for its Redis, its Ray head's GCS and
client server, and its services in one go): never the same one twice, and none an outgoing connection or
another bind(("", 0)) can take first. Before, a CI run's Ray head died because the port chosen for its
client server had been handed out again for a service, which bound it first."""

from services.shared.ports import RAY_WORKER_PORTS_END, ephemeral_range, free_port


def test_chosen_ports_are_never_given_twice_and_lie_outside_the_ephemeral_range():
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    inside = [p for p in ports if low <= p <= high or p <= RAY_WORKER_PORTS_END]
    assert not inside, f"{len(inside)} of 300 ports in the ephemeral range {low}-{high} or Ray's worker ports"
