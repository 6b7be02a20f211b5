"""Exactly one trainer node trains a session: a node takes the session's lease before it starts a learner,
and a second node's Start is refused naming the holder; a lease given back or expired can be taken."""

import grpc
import pytest

from services.shared import session
from services.shared.config import load
from services.shared.rpc import Server, channel
from services.trainer.lease import Lease, LeaseHeld, holder
from services.trainer.manager import TrainerManager
from services.trainer.server import TrainerServicer
from services.shared.protos import trainer_pb2, trainer_pb2_grpc
from tests.conftest import wait_until


def test_a_second_trainer_node_cannot_start_a_session_another_node_trains(redis_client, redis_server):
    sid = session.create(redis_client, load("cartpole"))
    Lease(redis_client, sid, "trainer-first").take()  # the node training it
    server = Server("127.0.0.1:0")
    server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
               TrainerServicer(TrainerManager(redis_client, redis_server.url, "trainer-second")), "mso.v1.TrainerService")
    server.start()
    try:
        with channel(server.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(ch).Start(trainer_pb2.TrainerStartRequest(session_id=sid),
                                                              timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"session {sid} is trained by node trainer-first" in err.value.details()
        assert holder(redis_client, sid) == "trainer-first"
    finally:
        server.stop(grace=0)


def test_a_lease_given_back_or_expired_can_be_taken(redis_client):
    first, second = Lease(redis_client, "s1", "a"), Lease(redis_client, "s1", "b")
    first.take()
    first.take()  # renewing one's own lease is fine
    with pytest.raises(LeaseHeld, match="trained by node a"):
        second.take()
    first.release()
    second.take()
    assert holder(redis_client, "s1") == "b"
    redis_client.pexpire(second.key, 1)  # its node died and stopped renewing it
    wait_until(lambda: redis_client.get(second.key) is None, 5, "the lease to expire")
    first.take()
    assert holder(redis_client, "s1") == "a"
