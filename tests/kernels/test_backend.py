"""The dispatch every op shares: masks in the layout the kernels index, and GPUs the kernels do not
support running the reference with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastseq.kernels import _backend, bucketed_attention, rms_norm
from fastseq.kernels._backend import key_mask
from tests.conftest import assert_close


def _transposed_mask(B: int, L: int) -> torch.Tensor:
    """A `(B, L)` padding mask stored key-major (a transposed view): stride (1, B)."""
    mask = torch.ones(L, B, dtype=torch.long)
    mask[L - 4 :, 0] = 0
    mask[3:9, 1] = 0
    return mask.t()


def test_key_mask_rows_are_contiguous():
    mask = _transposed_mask(3, 11)
    assert mask.stride() == (1, 3)
    got = key_mask(mask, mask.device)
    assert got.stride() == (11, 1)
    assert torch.equal(got, (mask != 0).to(torch.int8))


def test_key_mask_reads_a_bool_or_int8_mask_as_it_is():
    """What a model makes once per forward costs no conversion in each layer: a bool mask is read as
    int8 through a view of its bytes, an int8 one as it is; any other dtype is converted."""
    mask = _transposed_mask(3, 11).t().contiguous() != 0  # (3, 11) bool, rows contiguous
    got = key_mask(mask, mask.device)
    assert got.dtype == torch.int8 and got.data_ptr() == mask.data_ptr()
    assert torch.equal(got, mask.to(torch.int8))
    as_int8 = mask.to(torch.int8)
    assert key_mask(as_int8, mask.device) is as_int8
    converted = key_mask(mask.long() * 5, mask.device)
    assert converted.data_ptr() != mask.data_ptr() and torch.equal(converted, as_int8)
    transposed = _transposed_mask(3, 11) != 0  # bool, strided rows: copied
    assert key_mask(transposed, mask.device).stride() == (11, 1)


def test_a_transposed_padding_mask_gives_what_a_contiguous_one_gives(triton_backend):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 3, 2, 21, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    table = torch.randn(16, H, generator=g)
    mask = _transposed_mask(B, L)
    got = bucketed_attention(q, k, v, table, max_distance=20, key_padding_mask=mask)
    expected = bucketed_attention(q, k, v, table, max_distance=20, key_padding_mask=mask.contiguous())
    assert_close(got, expected, what="attention with a transposed mask")


class _FakeGPU:
    """Makes dispatch see a CUDA device of the given capability for CPU tensors."""

    def __init__(self, monkeypatch, capability, name):
        monkeypatch.setattr(_backend, "cuda_device", lambda *tensors: torch.device("cuda", 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(_backend, "_WARNED", set())


def test_a_gpu_below_sm80_runs_the_reference_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTSEQ_BACKEND", raising=False)
    _FakeGPU(monkeypatch, (7, 5), "Tesla T4")
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    with pytest.warns(UserWarning, match=r"Tesla T4 \(sm_75\).*sm_80") as caught:
        first = rms_norm(x, w)
        second = rms_norm(x, w)
    assert len([c for c in caught if "sm_75" in str(c.message)]) == 1
    assert torch.equal(first, second)
    assert _backend.use_triton("rms_norm", True, x) is False


def test_forcing_the_kernels_on_an_unsupported_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    _FakeGPU(monkeypatch, (7, 0), "Tesla V100")
    with pytest.raises(NotImplementedError, match=r"Tesla V100 \(sm_70\).*FASTSEQ_BACKEND=auto"):
        _backend.use_triton("rms_norm", True, torch.randn(2, 8))


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_sm80_and_newer_take_the_kernels(monkeypatch, capability):
    monkeypatch.delenv("FASTSEQ_BACKEND", raising=False)
    _FakeGPU(monkeypatch, capability, "GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_triton("rms_norm", True, torch.randn(2, 8)) is True


def test_host_rounding_is_tritons():
    """The launchers' `cdiv` and `next_power_of_2` (host code; Triton's are constexpr functions, slow
    to call from Python) give Triton's values."""
    import triton

    from fastseq.kernels._backend import cdiv, next_power_of_2

    for n in [*range(300), 1000, 4096, 4097, 2**31 + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for block in (1, 3, 16, 64, 128):
            assert cdiv(n, block) == triton.cdiv(n, block), (n, block)


def test_dropout_seed_is_drawn_on_the_inputs_device():
    """A kernel's dropout seed is drawn on its inputs' device, from that device's generator, and read
    there by the kernels (a captured CUDA graph then draws a new one at every replay: the CUDA-marked
    `test_cuda_graph_replays_draw_a_new_dropout_mask_each_time`). `torch.manual_seed` fixes it; without
    dropout there is none."""
    meta = _backend.draw_seed(0.1, torch.device("meta"))
    assert (meta.device.type, meta.dtype, tuple(meta.shape)) == ("meta", torch.int32, (1,))
    assert _backend.draw_seed(0.0, torch.device("meta")) is None
    seeds = []
    for manual in (3, 3, 4):
        torch.manual_seed(manual)
        seeds.append(_backend.draw_seed(0.1, torch.device("cpu")))
    assert seeds[0].dtype == torch.int32 and torch.equal(seeds[0], seeds[1]) and not torch.equal(seeds[0], seeds[2])


def test_a_launch_with_dropout_refuses_a_seed_it_cannot_read():
    """The launchers pass the seed tensor to the kernels, which read it on the inputs' device: a missing
    seed, one on another device or of another dtype is one line naming `draw_seed`; without dropout the
    kernels get a placeholder they never read."""
    cpu = torch.device("cpu")
    seed = torch.tensor([5], dtype=torch.int32)
    assert _backend.seed_arg(seed, 0.1, cpu) is seed
    assert _backend.seed_arg(None, 0.0, cpu).dtype == torch.int32
    bad_seeds = {
        "None": None,
        "torch.int64 (1,) on cpu": seed.long(),
        "torch.int32 (1,) on meta": seed.to("meta"),
        "torch.int32 (2,) on cpu": torch.tensor([1, 2], dtype=torch.int32),
    }
    for got, bad in bad_seeds.items():
        with pytest.raises(ValueError) as error:
            _backend.seed_arg(bad, 0.1, cpu)
        assert (
            str(error.value)
            == f"a kernel with dropout needs its seed as a (1,) int32 tensor on cpu (draw_seed); got {got}"
        )


class _Drawn(Exception):
    """Raised by the stand-in `draw_seed`: the call stops there."""


# Each op whose Triton kernel takes a dropout seed, the module that draws it, and a call with dropout.
SEEDED = {
    "bucketed_attention": "fastseq.kernels.bucketed_attention.op",
    "local_attention": "fastseq.kernels.local_attention",
    "gated_ffn": "fastseq.kernels.gated_gelu",
    "relu_ffn": "fastseq.kernels.gated_gelu",
}


def _seeded_call(op: str):
    from fastseq.kernels import gated_ffn, local_attention, relu_ffn

    q = torch.randn(1, 2, 16, 8)
    x, wi, wo = torch.randn(2, 3, 8), torch.randn(16, 8), torch.randn(8, 16)
    return {
        "bucketed_attention": lambda: bucketed_attention(q, q, q, None, dropout_p=0.1),
        "local_attention": lambda: local_attention(q, q, q, None, radius=3, dropout_p=0.1),
        "gated_ffn": lambda: gated_ffn(x, wi, wi.clone(), wo, 0.1),
        "relu_ffn": lambda: relu_ffn(x, wi, wo, 0.1),
    }[op]


@pytest.mark.parametrize("op", list(SEEDED))
def test_every_kernel_with_dropout_draws_its_seed_through_draw_seed(monkeypatch, triton_backend, op):
    """Each op's Triton path draws its dropout seed through `draw_seed`, on its input's device, so that
    every seed lives where the kernels read it."""
    import importlib

    drawn = []

    def draw_seed(dropout_p, device):
        drawn.append((dropout_p, device))
        raise _Drawn

    monkeypatch.setattr(importlib.import_module(SEEDED[op]), "draw_seed", draw_seed)
    with pytest.raises(_Drawn):
        _seeded_call(op)()
    assert drawn == [(0.1, torch.device("cpu"))]
