"""The Triton and torch releases the kernels are tested with, declared once and checked at use.

`TRITON_TESTED` and `TORCH_TESTED` are the oldest and newest (major, minor) releases of each range.
The oldest Triton is the one torch 2.11 pins and the GPU machines have; CI runs the quick kernel
tests under it (`.ci/run` reads it from here) and everything under the newest that pip resolves.
pyproject asks for at least the oldest of each (a test checks that the two agree).

The first use of a Triton kernel checks the installed releases (`_backend.use_triton`): an older
release is refused (`require_kernels`; under `FASTSEQ_BACKEND=auto` the references run instead,
with one warning: `kernels_usable`), a newer one runs with one warning naming the tested range.
"""

from __future__ import annotations

import functools
import operator
import warnings

import torch
import triton
import triton.language as tl

TRITON_TESTED = ((3, 6), (3, 9))
TORCH_TESTED = ((2, 11), (2, 14))


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.13.0+cpu" or "2.15.0.dev20260101"."""
    parts = [int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def installed_triton() -> str:
    return triton.__version__


def installed_torch() -> str:
    return torch.__version__


def _ranges() -> str:
    return " and ".join(
        f"{name} {a}.{b} to {c}.{d}" for name, ((a, b), (c, d)) in (("triton", TRITON_TESTED), ("torch", TORCH_TESTED))
    )


# Each check runs as plain Python under torch.compile too (its result is a constant of the graph), so
# that its warning or error is the same as in eager mode and a traced call costs nothing.
@torch.compiler.assume_constant_result
def kernels_usable() -> bool:
    """Whether the kernels may run under `FASTSEQ_BACKEND=auto`: False, with one warning saying what
    to install, when the installed Triton or torch is older than its tested range."""
    reason = _too_old()
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"{reason}. Until then every op runs its PyTorch reference", stacklevel=4)
    return reason is None


@torch.compiler.assume_constant_result
def require_kernels() -> bool:
    """True, or an error saying what to install when the installed Triton or torch is older than its
    tested range (`FASTSEQ_BACKEND=triton`)."""
    reason = _too_old()
    if reason is not None:
        raise RuntimeError(f"{reason} (or set FASTSEQ_BACKEND=reference or auto)")
    return True


_WARNED: set[str] = set()  # the too-old releases already warned about under `auto`


def _too_old() -> str | None:
    """Why the installed Triton or torch is too old for the kernels, saying what to install; None when
    both are in the tested range or newer (a newer one is warned about once)."""
    return _verdict(installed_triton(), installed_torch())


@functools.cache
def _verdict(triton_version: str, torch_version: str) -> str | None:
    old, new = [], []
    for name, version, (oldest, newest) in (
        ("triton", triton_version, TRITON_TESTED),
        ("torch", torch_version, TORCH_TESTED),
    ):
        found = release(version)
        if found < oldest:
            old.append((name, version, oldest, newest))
        elif found > newest:
            new.append((name, version, oldest, newest))
    if new:
        found = ", ".join(f"{name} {version}" for name, version, _, _ in new)
        warnings.warn(
            f"fastseq's Triton kernels are tested with {_ranges()}; found {found}. If they disagree with "
            "FASTSEQ_BACKEND=reference, install a tested release and report it",
            stacklevel=6,
        )
    if not old:
        return None
    found = ", ".join(f"{name} {version}" for name, version, _, _ in old)
    wanted = " ".join(f"'{name}>={a}.{b},<{c}.{d + 1}'" for name, _, (a, b), (c, d) in old)
    return f"fastseq's Triton kernels need {_ranges()}; found {found}. Install with: pip install {wanted}"


def fix_interpreter() -> None:
    """Let Triton's interpreter take a runtime loop bound under NumPy 2.4 and later.

    The interpreter holds every scalar, kernel arguments included, as a 1-element array and turns a
    `range()` bound into an int with `int(array)`, which NumPy 2.4 refuses for arrays of one
    dimension. Triton 3.6's interpreter does exactly that (fixed later upstream, triton-lang/triton
    #9171), so every kernel with a loop over a runtime bound fails there. Where the installed
    interpreter has the problem, its tensor patch is wrapped so that `__index__` takes the array's
    one element. The compiled kernels are untouched: this is the interpreter's Python only.
    """
    from triton.runtime import interpreter

    if not all(hasattr(interpreter, name) for name in ("_patch_lang_tensor", "_LangPatchScope", "TensorHandle")):
        return  # an interpreter organised otherwise: nothing known to fix
    if _index_works(interpreter):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope) -> None:
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patch_with_index


def _index_works(interpreter) -> bool:
    """Whether the interpreter turns its own 1-element scalar into an int."""
    import numpy as np

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(tl.tensor, scope)
        operator.index(tl.tensor(interpreter.TensorHandle(np.ones(1, np.int32), tl.int32), tl.int32))
        return True
    except TypeError:
        return False
    finally:
        scope.restore()
