"""The exact ring's executor (`ops.ring_allreduce`: csrc/ring.cpp and its Python reference)
run in one process: W members on threads, linked by socket pairs.

Results are checked against torch's own reduction; the C++ executor and the reference must
give bit-identical bytes, and may share one ring. Failures (signature mismatch, abort, a
neighbour closing its socket) must return at once with the reason, never hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lococomm import ops
from lococomm.collectives.exact_ring import native_schedule
from lococomm.collectives.ring_plan import plan_ring
from lococomm.ops import _build

HAVE_CPP = _build.get("cpu") is not None
IMPLS = ["torch", "cpp"] if HAVE_CPP else ["torch"]


def _ring_sockets(world: int) -> list[tuple[socket.socket, socket.socket]]:
    """(left, right) per member: member r's right is member r+1's left."""
    pairs = [socket.socketpair() for _ in range(world)]  # pair i links member i -> i+1
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    return [(pairs[(r - 1) % world][1], pairs[r][0]) for r in range(world)]


def _run_ring(
    inputs: list[torch.Tensor],
    op: str,
    impls: list[str],
    chunk_elements: int = 1000,
    headers: list[list[int]] | None = None,
    abort_fds: list[int] | None = None,
    timeout: float = 20.0,
) -> tuple[list[torch.Tensor], list[str]]:
    world = len(inputs)
    links = _ring_sockets(world)
    results = [torch.empty_like(x) for x in inputs]
    errors = [""] * world
    pipes = [os.pipe() for _ in range(world)] if abort_fds is None else None
    fds = abort_fds if abort_fds is not None else [p[0] for p in pipes]

    def member(r: int) -> None:
        plan = plan_ring(inputs[r].numel(), world, 1, chunk_elements)
        recvs, sends = native_schedule(plan, r, op)
        header = torch.tensor(headers[r] if headers else [1, 2, inputs[r].numel()], dtype=torch.int64)
        errors[r] = ops.ring_allreduce(
            links[r][0].fileno(), links[r][1].fileno(), fds[r], inputs[r], results[r],
            recvs, sends, op, world, timeout, header, torch.empty_like(header), impl=impls[r % len(impls)],
        )
        if errors[r]:  # as exact_ring does: a failed member closes its sockets
            links[r][0].close()
            links[r][1].close()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "ring executor hung"
    for left, right in links:
        left.close()
        right.close()
    if pipes is not None:
        for a, b in pipes:
            os.close(a)
            os.close(b)
    return results, errors


def _inputs(world: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        if dtype.is_floating_point:
            out.append(torch.randn(numel, generator=g).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, (numel,), generator=g).bool())
        else:
            out.append(torch.randint(-50, 50, (numel,), generator=g).to(dtype))
    return out


def _expected(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    stacked = torch.stack([x.to(torch.float64) for x in inputs])
    if op in ("sum", "mean"):
        value = stacked.sum(0)
        return value / len(inputs) if op == "mean" else value
    return stacked.max(0).values if op == "max" else stacked.min(0).values


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(
    "dtype,op",
    [
        (torch.float32, "sum"),
        (torch.float32, "mean"),
        (torch.float64, "max"),
        (torch.int64, "sum"),
        (torch.int32, "min"),
        (torch.bfloat16, "sum"),
        (torch.float16, "mean"),
        (torch.int8, "max"),
    ],
)
def test_ring_reduces_exactly_and_every_member_holds_the_same_bytes(impl, world, dtype, op):
    numel = 10_007  # not a multiple of W or of the chunk: uneven segments and a short tail
    inputs = _inputs(world, numel, dtype)
    before = [x.clone() for x in inputs]
    results, errors = _run_ring(inputs, op, [impl], chunk_elements=999)
    assert errors == [""] * world
    for x, original in zip(inputs, before):
        assert torch.equal(x, original)  # the input is only read
    for r in range(1, world):
        assert torch.equal(results[r].view(torch.uint8), results[0].view(torch.uint8))
    want = _expected(inputs, op)
    got = results[0].to(torch.float64)
    if dtype in (torch.int64, torch.int32, torch.int8) or op in ("max", "min"):
        assert torch.equal(got, want)
    else:
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 1e-2}[dtype]
        assert (got - want).abs().max() < tolerance * max(1.0, float(want.abs().max()))


@pytest.mark.skipif(not HAVE_CPP, reason="C++ extension unavailable")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_cpp_and_reference_give_the_same_bytes_and_can_share_a_ring(world):
    inputs = _inputs(world, 50_001, torch.float32)
    cpp, errors = _run_ring(inputs, "mean", ["cpp"])
    assert errors == [""] * world
    reference, errors = _run_ring(inputs, "mean", ["torch"])
    assert errors == [""] * world
    mixed, errors = _run_ring(inputs, "mean", ["cpp", "torch"])
    assert errors == [""] * world
    for r in range(world):
        assert torch.equal(cpp[r].view(torch.uint8), reference[r].view(torch.uint8))
        assert torch.equal(cpp[r].view(torch.uint8), mixed[r].view(torch.uint8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_and_empty_tensors(impl):
    for numel in (0, 1, 3):
        inputs = _inputs(4, numel, torch.float32)
        results, errors = _run_ring(inputs, "sum", [impl])
        assert errors == [""] * 4
        assert torch.allclose(results[0], sum(inputs))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_signature_mismatch_stops_before_any_data_is_read(impl):
    world = 3
    inputs = _inputs(world, 4000, torch.float32)
    headers = [[1, 1, 4000], [1, 1, 4001], [1, 1, 4000]]  # member 1 claims another size
    _, errors = _run_ring(inputs, "sum", [impl], headers=headers)
    # member 1 sees its left neighbour's header differ, member 2 sees member 1's differ; both
    # say so; member 0 learns it from the closed connection
    assert errors[1] == "signature mismatch" and errors[2] == "signature mismatch", errors
    assert errors[0], errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_abort_fd_stops_a_ring_waiting_for_a_silent_neighbour(impl):
    # member 1 never runs: member 0 waits for its data until the abort pipe is written
    links = _ring_sockets(2)
    read_end, write_end = os.pipe()
    x = torch.ones(100_000)
    plan = plan_ring(x.numel(), 2, 1, 10_000)
    recvs, sends = native_schedule(plan, 0, "sum")
    header = torch.tensor([1, 2, 3], dtype=torch.int64)
    threading.Timer(0.3, os.write, (write_end, b"!")).start()
    started = time.monotonic()
    err = ops.ring_allreduce(
        links[0][0].fileno(), links[0][1].fileno(), read_end, x, torch.empty_like(x),
        recvs, sends, "sum", 2, 30.0, header, torch.empty_like(header), impl=impl,
    )
    elapsed = time.monotonic() - started
    assert err == "aborted" and 0.25 < elapsed < 2.0, (err, elapsed)
    # the same wait with no abort ends at the deadline
    quiet_read, quiet_write = os.pipe()
    started = time.monotonic()
    err = ops.ring_allreduce(
        links[0][0].fileno(), links[0][1].fileno(), quiet_read, x, torch.empty_like(x),
        recvs, sends, "sum", 2, 0.3, header, torch.empty_like(header), impl=impl,
    )
    assert err == "timed out waiting for peers" and time.monotonic() - started < 2.0, err
    for left, right in links:
        left.close()
        right.close()
    for fd in (read_end, write_end, quiet_read, quiet_write):
        os.close(fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_a_neighbour_closing_its_socket_fails_the_ring_at_once(impl):
    links = _ring_sockets(2)
    read_end, write_end = os.pipe()
    x = torch.ones(1_000_000)
    plan = plan_ring(x.numel(), 2, 1, 100_000)
    recvs, sends = native_schedule(plan, 0, "sum")
    header = torch.tensor([7], dtype=torch.int64)
    # member 1 sends its header and part of its data, then dies (its sockets close)
    other_left, other_right = links[1]
    other_right.setblocking(True)
    other_right.sendall(header.numpy().tobytes() + b"\0" * 4096)
    threading.Timer(0.2, lambda: (other_left.close(), other_right.close())).start()
    started = time.monotonic()
    err = ops.ring_allreduce(
        links[0][0].fileno(), links[0][1].fileno(), read_end, x, torch.empty_like(x),
        recvs, sends, "sum", 2, 30.0, header, torch.empty_like(header), impl=impl,
    )
    assert "peer closed" in err or "failed" in err, err
    assert time.monotonic() - started < 2.0
    links[0][0].close()
    links[0][1].close()
    os.close(read_end)
    os.close(write_end)


def test_schedule_rejects_bad_arguments():
    x = torch.ones(10)
    header = torch.tensor([1], dtype=torch.int64)
    recvs, sends = native_schedule(plan_ring(10, 2, 1, 5), 0, "sum")
    with pytest.raises(ValueError, match="ring op"):
        ops.ring_allreduce(0, 0, 0, x, torch.empty_like(x), recvs, sends, "prod", 2, 1.0, header, header)
    with pytest.raises(ValueError, match="one dtype and length"):
        ops.ring_allreduce(0, 0, 0, x, torch.empty(9), recvs, sends, "sum", 2, 1.0, header, header)
    with pytest.raises(ValueError, match="headers"):
        ops.ring_allreduce(0, 0, 0, x, torch.empty_like(x), recvs, sends, "sum", 2, 1.0, header, torch.empty(2, dtype=torch.int64))
    if HAVE_CPP:
        bad = sends.clone()
        bad[0, 1] = 11  # beyond the tensor
        with pytest.raises(RuntimeError, match="bad range"):
            ops.ring_allreduce(0, 0, 0, x, torch.empty_like(x), recvs, bad, "sum", 2, 1.0, header, header, impl="cpp")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLS)
def test_ctrl_c_during_a_ring_raises_at_once(impl):
    # a blocking ring waits for a silent neighbour; SIGINT must not wait for its deadline (30 s)
    script = f"""
import os, signal, socket, threading, time, torch
from lococomm import ops
from lococomm.collectives.exact_ring import native_schedule
from lococomm.collectives.ring_plan import plan_ring
a, b = socket.socketpair(); c, d = socket.socketpair()
for s in (a, b, c, d):
    s.setblocking(False)
read_end, _ = os.pipe()
x = torch.ones(1000)
recvs, sends = native_schedule(plan_ring(1000, 2, 1, 100), 0, "sum")
header = torch.tensor([1])
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
try:
    ops.ring_allreduce(a.fileno(), c.fileno(), read_end, x, torch.empty_like(x), recvs, sends,
                       "sum", 2, 30.0, header, torch.empty_like(header), impl={impl!r})
except KeyboardInterrupt:
    print("interrupted after", round(time.monotonic() - started, 2))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and "interrupted after" in out.stdout, out
    assert float(out.stdout.split()[-1]) < 3.0, out.stdout


@pytest.mark.skipif(not HAVE_CPP, reason="C++ extension unavailable")
@pytest.mark.timeout(30)
def test_a_closed_abort_fd_counts_as_an_abort():
    links = _ring_sockets(2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    x = torch.ones(1000)
    recvs, sends = native_schedule(plan_ring(1000, 2, 1, 100), 0, "sum")
    header = torch.tensor([1], dtype=torch.int64)
    started = time.monotonic()
    err = ops.ring_allreduce(
        links[0][0].fileno(), links[0][1].fileno(), read_end, x, torch.empty_like(x),
        recvs, sends, "sum", 2, 10.0, header, torch.empty_like(header), impl="cpp",
    )
    assert err == "aborted" and time.monotonic() - started < 1.0, err
    for left, right in links:
        left.close()
        right.close()


@pytest.mark.timeout(60)
def test_exiting_while_an_async_ring_runs_exits_cleanly():
    # the ring thread is inside the executor when the main thread exits: the exit hook aborts
    # it, so the process ends with its own status instead of dying in finalization (SIGABRT)
    worker = Path(__file__).with_name("ring_exit_worker.py")
    out = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "exiting with 3" in out.stdout
