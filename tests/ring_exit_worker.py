"""Helper of test_ring_executor.py: an async exact all-reduce is on the ring thread (inside
the executor, waiting for a neighbour that never sends) when the main thread exits. The
process must exit with the status it asked for, not die in interpreter finalization.

    ring_exit_worker.py            rank 0 (spawns rank 1, exits with status 3)
    ring_exit_worker.py PORT       rank 1 (connects, stays silent, then leaves)
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.distributed as dist

from lococomm.collectives import exact
from lococomm.collectives.abort import AbortSignal
from lococomm.collectives.buffers import BufferPool, Graveyard
from lococomm.collectives.communicator import Communicator
from lococomm.collectives.ring_sockets import connect_ring


def main() -> None:
    if len(sys.argv) > 1:  # rank 1
        store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, wait_for_workers=False)
        sockets = connect_ring(dist.PrefixStore("e/ring", store), 1, 2, "127.0.0.1", AbortSignal(), 20)
        time.sleep(5.0)
        sockets.close()
        return
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, __file__, str(master.port)])
    abort = AbortSignal()
    store = dist.TCPStore("127.0.0.1", master.port, is_master=False, wait_for_workers=False)
    comm = Communicator(
        pg=object(), rank=0, world_size=2, abort=abort, pool=BufferPool(), graveyard=Graveyard(),
        timeout=30.0, fail=lambda reason: print("failed:", reason, flush=True),
        connect_ring=lambda: connect_ring(dist.PrefixStore("e/ring", store), 0, 2, "127.0.0.1", abort, 20),
    )
    handle = exact.allreduce(comm, torch.randn(1 << 20), "sum", "t", blocking=False)
    time.sleep(1.0)  # connected; the ring waits for rank 1's data
    print("exiting with 3", flush=True)
    peer.kill()
    del handle
    sys.exit(3)


if __name__ == "__main__":
    main()
