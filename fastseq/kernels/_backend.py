"""Backend selection shared by every op.

`FASTSEQ_BACKEND` picks the implementation:
- `auto` (default): the Triton kernel when the inputs live on a CUDA device and
  the op has one, the PyTorch reference otherwise.
- `reference`: always the reference.
- `triton`: always the Triton kernel; on the CPU this needs `TRITON_INTERPRET=1`.

`FASTSEQ_BACKEND_<OP>` (for example `FASTSEQ_BACKEND_BUCKETED_ATTENTION=triton`) overrides
it for one op.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import torch

from . import _versions

_CHOICES = ("auto", "reference", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every Triton kernel takes


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype the references compute in: fp32 for half precision, else x's own (fp32 or fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (what the kernels index by), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


_PLACEHOLDERS: dict[tuple, torch.Tensor] = {}


def placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for a kernel argument that a launch's flags leave unread, made once per shape,
    dtype and device (an allocation is host time on every call; torch.compile traces a fresh one)."""
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    key = (shape, dtype, device)
    cached = _PLACEHOLDERS.get(key)
    if cached is None:
        with torch.inference_mode(False):
            cached = _PLACEHOLDERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return cached


def key_mask(key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A `(B, L)` key mask as the kernels read it: int8, nonzero = attend, rows contiguous (the kernels
    index keys with a unit stride, so a transposed or strided mask is copied); an empty `(0, 1)` for None.
    An int8 or bool mask with contiguous rows is read as it is (a bool is one byte, 0 or 1): a model that
    makes its mask bool once per forward pays no conversion in each layer."""
    if key_padding_mask is None:
        return placeholder((0, 1), torch.int8, device)
    if key_padding_mask.stride(-1) == 1 or key_padding_mask.shape[-1] == 1:
        if key_padding_mask.dtype == torch.int8:
            return key_padding_mask
        if key_padding_mask.dtype == torch.bool:
            return key_padding_mask.view(torch.int8)
    return (key_padding_mask != 0).to(torch.int8).contiguous()


def autocast_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype autocast gives a matmul of these tensors (their device type's autocast dtype), or None
    when autocast is off for that device type."""
    device_type = next((t.device.type for t in tensors if t is not None), "cpu")
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as autocast casts a matmul's inputs: floating tensors other than fp64 to `dtype`
    (differentiably, so a parameter's gradient comes back in its own dtype), the rest unchanged."""
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast disabled on `tensor`'s device type: an op that has cast its inputs runs
    its own fp32 math and casts inside it, untouched by autocast. Nothing to enter when autocast is off
    (building a `torch.autocast` is host time on every call)."""
    if not torch.is_autocast_enabled(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` for the launchers: Triton's own is a constexpr function, about 7 us a call on the
    host (the CPU of `bench_bucketed_attention.py --host`)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for the launchers (0 for 0), as fast as `cdiv`."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def backend(op: str | None = None) -> str:
    """The backend asked for `op` by `FASTSEQ_BACKEND_<OP>`, else by `FASTSEQ_BACKEND`
    (read on every call so tests can switch it)."""
    for name in ([f"FASTSEQ_BACKEND_{op.upper()}"] if op else []) + ["FASTSEQ_BACKEND"]:
        value = os.environ.get(name, "").strip().lower()
        if not value:
            continue
        if value not in _CHOICES:
            raise ValueError(f"{name}={value!r} is not one of {_CHOICES}; unset it or pick one of those")
        return value
    return "auto"


def cuda_device(*tensors: torch.Tensor | None) -> torch.device | None:
    """The CUDA device of the first tensor that lives on one, or None."""
    return next((t.device for t in tensors if t is not None and t.is_cuda), None)


# The oldest GPU the kernels are built for: sm_80 (A100) has bf16 tensor cores and the shared memory
# the smallest tiles need; sm_75 (T4) and sm_70 (V100) have neither.
MIN_CAPABILITY = (8, 0)
_WARNED: set[str] = set()


def unsupported_gpu(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on this CUDA device, or None."""
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}): the kernels need sm_{MIN_CAPABILITY[0]}"
        f"{MIN_CAPABILITY[1]} or newer (bf16 tensor cores, the shared memory of their tiles)"
    )


def capturing(tensor: torch.Tensor) -> bool:
    """Whether a CUDA graph is capturing the current stream of `tensor`'s CUDA device (False for other
    devices: CPU builds of torch cannot ask)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def draw_seed(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """A kernel call's dropout seed, `(1,)` int32, drawn on the inputs' device from PyTorch's generator
    of that device (`torch.manual_seed` fixes the masks); None without dropout. The kernels read it
    there (`seed_arg`): nothing goes back to the host, and a CUDA graph that captures the call draws a
    new seed at every replay (PyTorch's CUDA generators are graph-safe), so captured dropout drops
    other elements each time."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=device)


def seed_arg(seed: torch.Tensor | None, dropout_p: float, device: torch.device) -> torch.Tensor:
    """What a kernel's seed pointer gets: with dropout, the call's `(1,)` int32 seed on the inputs'
    device (`draw_seed`), which the kernel reads once per program (32 bits: one register where the key
    loops need every one, and Philox's high key word the constant 0); without, a placeholder it never
    reads."""
    if dropout_p == 0.0:
        return placeholder((1,), torch.int32, device)
    if seed is None or seed.device != device or seed.dtype != torch.int32 or seed.numel() != 1:
        got = "None" if seed is None else f"{seed.dtype} {tuple(seed.shape)} on {seed.device}"
        raise ValueError(
            f"a kernel with dropout needs its seed as a (1,) int32 tensor on {device} (draw_seed); got {got}"
        )
    return seed


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_dtypes(*tensors: torch.Tensor | None) -> str | None:
    """Why a Triton kernel cannot take these tensors' dtypes, or None."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if dtypes <= set(KERNEL_DTYPES):
        return None
    return f"dtypes {sorted(map(str, dtypes))} (the kernel takes float16, bfloat16 and float32)"


def use_triton(
    op: str,
    has_kernel: bool,
    *tensors: torch.Tensor | None,
    unsupported: Callable[[], str | None] | None = None,
) -> bool:
    """Whether `op` runs its Triton kernel for these inputs.

    `has_kernel` says whether the op ships a Triton kernel in this build; `unsupported`, asked only
    when the kernel would run, says why it cannot take these inputs (or None). A GPU older than
    `MIN_CAPABILITY` runs the reference, with one warning per device kind. Forcing
    `FASTSEQ_BACKEND=triton` for an op without a kernel, for inputs its kernel does not take, or on
    CPU tensors without the interpreter, is an error rather than a silent fallback; under `auto`
    such inputs go to the reference, with one warning per reason on a GPU.

    Before a kernel runs, the installed Triton and torch are checked against the tested ranges
    (`_versions`): a newer release runs with one warning. An older one is an error under `triton`;
    under `auto` every op runs its reference, with one warning saying what to install: the reference
    computes the same function, so a run that works without the kernels is not stopped for want of
    their speed, as with inputs the kernels do not take.
    """
    choice = backend(op)
    if choice == "reference":
        return False
    device = cuda_device(*tensors)
    on_cuda = device is not None
    if on_cuda and (reason := unsupported_gpu(device)):
        if choice == "triton":
            raise NotImplementedError(f"{op}: the Triton kernels do not support {reason}; set FASTSEQ_BACKEND=auto")
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"fastseq runs its PyTorch reference ops on {reason}", stacklevel=3)
        return False
    if choice == "auto":
        if not (has_kernel and on_cuda):
            return False
        if unsupported is not None and (reason := unsupported()) is not None:
            if reason not in _WARNED:  # said once: the run goes on, at PyTorch's speed
                _WARNED.add(reason)
                warnings.warn(f"{op} runs its PyTorch reference for {reason}", stacklevel=3)
            return False
        return _versions.kernels_usable()
    if not has_kernel:
        raise NotImplementedError(
            f"{op}: no Triton kernel is available for this op; set FASTSEQ_BACKEND=reference or auto"
        )
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{op}: FASTSEQ_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
            "(or move the inputs to a CUDA device)"
        )
    reason = unsupported() if unsupported is not None else None
    if reason is not None:
        raise NotImplementedError(
            f"{op}: the Triton kernel does not support {reason}; set FASTSEQ_BACKEND=reference or auto"
        )
    return _versions.require_kernels()
