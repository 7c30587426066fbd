"""``free_port()``: a TCP port on 127.0.0.1 that nothing listens on right now, for a
``torch.distributed`` rendezvous (torchrun's ``--master-port``, ``MASTER_PORT``, a Ray actor group).

The port is only free when asked: another process may take it before the caller binds it.
Fixed ports collide when two runs share a machine, which is why every launch asks here.
"""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
