"""Bucket planning for DataParallel: a pure function, tested without processes."""

from __future__ import annotations

import pytest

from lococomm.algorithms.buckets import ParamInfo, layout_hash, plan_buckets

MB = 1 << 20


def fp32(*shape: int, device: str = "cpu") -> ParamInfo:
    return ParamInfo(tuple(shape), "torch.float32", device, 4)


def linear_stack(layers: int, width: int) -> list[ParamInfo]:
    """Registration order of nn.Linear layers: weight, bias, weight, bias, ..."""
    params = []
    for _ in range(layers):
        params += [fp32(width, width), fp32(width)]
    return params


def test_buckets_follow_reverse_registration_order_and_cover_every_parameter_once():
    params = linear_stack(8, 256)  # 256 KiB weights
    buckets = plan_buckets(params, bucket_bytes=MB, first_bucket_bytes=MB // 4)
    order = [i for b in buckets for i in b.params]
    assert order == list(reversed(range(len(params))))
    for b in buckets:
        sizes = [params[i].numel for i in b.params]
        assert list(b.offsets) == [sum(sizes[:k]) for k in range(len(sizes))]
        assert b.numel == sum(sizes)
    assert [b.index for b in buckets] == list(range(len(buckets)))


def test_first_bucket_is_small_and_later_buckets_reach_the_cap():
    params = linear_stack(16, 256)  # 16 x (256 KiB + 1 KiB)
    buckets = plan_buckets(params, bucket_bytes=MB, first_bucket_bytes=MB // 4)
    # Bucket 0: last layer's bias + weight, just over 256 KiB: communication starts early.
    assert buckets[0].params == (31, 30)
    assert MB // 4 <= buckets[0].nbytes < MB // 4 + 2048
    for b in buckets[1:-1]:
        assert MB <= b.nbytes < MB + 256 * 1024 + 1024  # closes as soon as it holds the cap
    assert buckets[-1].nbytes <= MB + 256 * 1024 + 1024


def test_parameter_larger_than_cap_gets_a_bucket_of_its_own():
    params = [fp32(10), fp32(1024, 1024), fp32(10)]
    buckets = plan_buckets(params, bucket_bytes=MB // 2, first_bucket_bytes=16)
    assert [b.params for b in buckets] == [(2,), (1,), (0,)]


def test_dtypes_and_devices_never_share_a_bucket():
    params = [
        fp32(100),
        ParamInfo((100,), "torch.float64", "cpu", 8),
        ParamInfo((100,), "torch.bfloat16", "cpu", 2),
        fp32(100),
        ParamInfo((100,), "torch.float64", "cpu", 8),
        fp32(100, device="cuda:0"),
    ]
    buckets = plan_buckets(params, bucket_bytes=MB)
    for b in buckets:
        assert len({(params[i].dtype, params[i].device) for i in b.params}) == 1
        assert b.dtype == params[b.params[0]].dtype
    assert sorted(i for b in buckets for i in b.params) == list(range(len(params)))
    f32 = next(b for b in buckets if b.dtype == "torch.float32" and b.device == "cpu")
    assert f32.params == (3, 0)


def test_plan_is_deterministic_and_hash_tracks_layout_and_config():
    params = linear_stack(6, 128)
    a = plan_buckets(params, bucket_bytes=100_000, first_bucket_bytes=20_000)
    b = plan_buckets(list(params), bucket_bytes=100_000, first_bucket_bytes=20_000)
    assert a == b
    assert layout_hash(params, a, "exact") == layout_hash(params, b, "exact")
    assert layout_hash(params, a, "exact") != layout_hash(params, a, "int8")
    other = plan_buckets(params, bucket_bytes=200_000, first_bucket_bytes=20_000)
    assert layout_hash(params, a) != layout_hash(params, other)
    reshaped = [*params[:-1], fp32(1, 128)]  # same numel, different shape
    assert layout_hash(params, a) != layout_hash(reshaped, plan_buckets(reshaped, 100_000, 20_000))
    # Local device index does not matter (rank r of every replica group uses its own GPU).
    on0 = [fp32(10, device="cuda:0")]
    on1 = [fp32(10, device="cuda:1")]
    assert layout_hash(on0, plan_buckets(on0, MB)) == layout_hash(on1, plan_buckets(on1, MB))


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([fp32(4)], bucket_bytes=0)
    with pytest.raises(ValueError, match="first_bucket_bytes"):
        plan_buckets([fp32(4)], bucket_bytes=10, first_bucket_bytes=-1)
