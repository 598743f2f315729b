"""Fused numeric kernels of lococomm, each with a pure-PyTorch reference.

=========================  ==========================================================  =====
op                         what                                                        CUDA
=========================  ==========================================================  =====
quantize                   block-absmax int8/int4/int2, nearest or seeded stochastic   yes
quantize(mode="ef")        ... fused with the EF residual: p = x + e, e' = p - D(Q(p))  yes
quantize(mode="ef21")      ... fused with EF21: p = x - h, h' = h + D(Q(p))             yes
dequantize                 code * scale                                                yes
dequantize_accumulate_     acc += code * scale (ring reduce-scatter hop)               yes
cast_encode / cast_decode  p = x (+ e) to fp32/bf16/fp16 (+ error); wire -> fp32 / W      no
topk / topk_chunked        exact top-|p| (ties -> lower index) + EF residual          no
sparseloco_encode          chunked top-k + 2-bit values (sign, lo/hi level) + EF        no
chunked_sparse_sum         sum of chunked TopK/SparseLoCo payloads, / divisor          no
lowrank_product            P Q^T as a fixed-order sum of outer products (PowerSGD)     no
nesterov_outer_            DiLoCo SGD-Nesterov step fused with the pseudo-gradient    no
pseudo_gradient            snapshot - local                                            no
rng_u32                    the counter-based RNG (seed, index) -> uint32               --
ring_allreduce             exact ring all-reduce schedule over two TCP sockets         no
heal_stream                healing's chunked, checksummed state streams over TCP       no
=========================  ==========================================================  =====

``backend(device)`` says which implementation runs: "cuda" (CUDA tensors, CUDA available and
the extension built), "cpp" (CPU tensors, C++ extension built or prebuilt) or "torch" (the
reference in ``ops.reference``). Ops without a CUDA kernel run the reference on CUDA tensors.

Determinism: every backend produces bit-identical results for the same input bytes and seed,
independent of the thread count (torch.get_num_threads() sets the kernels' OpenMP threads).
"""

from .kernels import (
    FLOAT_DTYPES,
    backend,
    cast_decode,
    cast_encode,
    checksum,
    checksum_copy,
    chunked_counts,
    chunked_sparse_sum,
    dequantize,
    dequantize_accumulate_,
    heal_stream,
    lowrank_product,
    nesterov_outer_,
    pseudo_gradient,
    quantize,
    ring_allreduce,
    rng_u32,
    sparseloco_encode,
    topk,
    topk_chunked,
)
from .reference import k_of, num_blocks, packed_bytes, rng_keys

__all__ = [
    "FLOAT_DTYPES",
    "checksum",
    "checksum_copy",
    "backend",
    "cast_decode",
    "cast_encode",
    "chunked_counts",
    "chunked_sparse_sum",
    "dequantize",
    "dequantize_accumulate_",
    "heal_stream",
    "k_of",
    "lowrank_product",
    "nesterov_outer_",
    "num_blocks",
    "packed_bytes",
    "pseudo_gradient",
    "quantize",
    "rng_keys",
    "ring_allreduce",
    "rng_u32",
    "sparseloco_encode",
    "topk",
    "topk_chunked",
]
