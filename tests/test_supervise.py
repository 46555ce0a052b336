"""jaxgen.cli.supervise: what the parent of one process of a multi-process job holds back,
and how it finds the peers that are gone when a collective fails naming nobody."""

import socket

from jaxgen.cli import supervise


def test_runtime_failures_start_the_held_text_and_progress_does_not():
    starts = [
        "terminate called after throwing an instance of 'gloo::EnforceNotMet'",
        "[enforce fail at external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= op.nbytes.",
        "Traceback (most recent call last):",
        "F1204 10:37:34.861895   25930 client.h:80] Terminating process",
    ]
    passes = [
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1",
        "step      4  loss 5.2879  grad 1.039",
    ]
    assert all(supervise._FAILURE_START.match(line) for line in starts)
    assert not any(supervise._FAILURE_START.match(line) for line in passes)


def test_peers_whose_supervisor_is_gone_are_unreachable():
    alive = socket.create_server(("", 0))
    gone = socket.create_server(("", 0))
    gone_port = gone.getsockname()[1]
    gone.close()  # the kernel now refuses connections to its port
    try:
        supervisors = {
            0: f"localhost:{alive.getsockname()[1]}",
            1: f"localhost:{gone_port}",
            2: f"localhost:{alive.getsockname()[1]}",
            3: "no-such-host.invalid:1",  # an unresolvable name never names a process
        }
        assert supervise.unreachable(supervisors, me=0, timeout=2) == {1}
        assert supervise.unreachable({0: supervisors[0]}, me=0) == set()
    finally:
        alive.close()
