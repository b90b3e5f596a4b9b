"""Launching a compiled Triton kernel again without Triton's per-call binding.

`kernel[grid](*args, **meta)` goes through `JITFunction.run` at every call: it binds every argument
and works out what each one specializes on (its type, a pointer's 16-byte alignment, an integer's
value 1 or divisibility by 16, `triton.jit`'s `do_not_specialize` aside), builds the key of the
compiled kernel from them, looks the kernel up and only then calls its launcher. On this project's
CPU that Python took 16 µs of the attention forward's launch and 58 µs of a layer's four launches
(`bench/bench_bucketed_attention.py --host`), almost half of the layer's host time.

`launch_kernel` goes through `JITFunction.run` once per configuration (a new shape is a new
configuration: the key holds the values of the strides and sizes) and keeps the compiled kernel
under a key of its own that determines everything the binding would have specialized: the values and
types of the numbers Triton specializes on, the types of those it does not (`do_not_specialize`) and
whether they fit in 32 bits, each pointer's dtype and address modulo 16, the meta-parameters, the
device and the options Triton reads from its knobs. A call with that key calls the compiled kernel's
launcher directly, while Triton's caches for the device are the ones it was found in. A launch hook
that calls something (a profiler's), a pre-run hook and the like get Triton's own launch
(`_triton_decides`), as do a grid that is not a tuple and a call whose arguments do not lay out like
those of the call that made the key (`_Site.lays_out`). The direct launch skips Triton's check that
the globals a kernel reads have not changed since it compiled: these kernels read no mutable globals.
"""

from __future__ import annotations

import operator

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

_INT32 = (-(2**31), 2**31)
_PER_SITE = 1024  # compiled kernels kept per site; past that the site starts over


class _Site:
    """One kernel launched with a given number of positional arguments: where its pointers, the
    integers it does not specialize on and the other scalars sit, taken from its first launch, and
    the compiled kernels found for it, by key."""

    def __init__(self, jit, args: tuple):
        self.jit = jit
        params = jit.params
        self.pointers = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self.plain = tuple(i for i in range(len(args)) if i not in self.pointers and params[i].do_not_specialize)
        self.values = tuple(i for i in range(len(args)) if i not in self.pointers and i not in self.plain)
        self.get_pointers = _getter(self.pointers)
        self.get_plain = _getter(self.plain)
        self.get_values = _getter(self.values)
        # What a call's meta-parameters leave to the kernel's defaults, in the order of its parameters.
        self.rest = [(p.name, jit.signature.parameters[p.name].default) for p in params[len(args) :]]
        # The runtime (not constexpr) parameters: the key reads them by position, so a call that passes
        # one by keyword is not kept.
        self.runtime = {p.name for p in params if not p.is_constexpr}
        self.compiled: dict = {}

    def key(self, args: tuple, meta: dict, device) -> tuple | None:
        """What determines the compiled kernel of this call, or None where Triton's binding must decide:
        an integer it does not specialize on past int32, or an argument that is not what the site's first
        launch had there (None or another object for a tensor; anything its comparison with a number
        fails on)."""
        runtime, compilation = knobs.runtime, knobs.compilation
        plain = self.get_plain(args)
        try:
            if plain and (min(plain) < _INT32[0] or max(plain) >= _INT32[1]):
                return None
            pointers = tuple([(t.dtype, t.data_ptr() & 15) for t in self.get_pointers(args)])
        except (AttributeError, TypeError, RuntimeError):  # (a tensor's comparison raises RuntimeError)
            return None
        values = self.get_values(args)
        types = tuple(map(type, plain + values))
        options = (
            runtime.debug,
            compilation.instrumentation_mode,
            getattr(compilation, "fpsan_homomorphic_casts", None),
        )
        return (device, pointers, values, types, tuple(meta.items()), options)

    def lays_out(self, args: tuple, meta: dict) -> bool:
        """Whether `args` hold Python numbers wherever the site's first launch did, and `meta` only
        constexprs and launch options: the layout the key reads. (A tensor or a tuple there would be
        keyed as an object, whose storage can change under it; `meta`'s values are keyed without their
        types, which Triton reads only for a parameter that is not a constexpr.) A pointer's place holds
        no number: the key reads its dtype and address, or gives up."""
        numbers = all(isinstance(args[i], (int, float)) for i in self.plain + self.values)
        return numbers and not self.runtime.intersection(meta)

    def tail(self, meta: dict) -> tuple:
        """The values after the positional ones that Triton's launch passes to the C launcher: every
        remaining parameter, from `meta` or its default."""
        return tuple(meta[name] if name in meta else default for name, default in self.rest)


def _getter(positions: tuple[int, ...]):
    """`args -> tuple(args[i] for i in positions)` at C speed."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _hooked(hook) -> bool:
    """Whether a launch hook would call anything: Triton's are chains (`knobs.HookChain`), empty unless a
    profiler adds to them; the C launcher calls a chain with the launch's metadata, and skips None."""
    return hook is not None and bool(getattr(hook, "calls", True))


_SITES: dict = {}


def launch_kernel(kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """`kernel[grid](*args, **meta)`: positional `args` (the pointers, strides, sizes and scalars) and
    keyword `meta` (the constexpr meta-parameters and launch options). A `JITFunction` launches through
    its compiled kernel's C launcher once Triton's own launch has compiled or found it for the same key
    (`_Site.key`); anything else (the interpreter's kernels, a test's stand-in) is called as above."""
    if type(kernel) is not JITFunction:
        kernel[grid](*args, **meta)
        return
    # By identity: a JITFunction hashes its source. The site holds the kernel, so the id stays its own.
    site = _SITES.get((id(kernel), len(args)))
    if site is None:
        site = _SITES[(id(kernel), len(args))] = _Site(kernel, args)
    active = driver.active
    device = active.get_current_device()
    key = None
    if type(grid) is tuple and not _triton_decides(kernel):
        key = site.key(args, meta, device)
    found = site.compiled.get(key) if key is not None else None
    # Triton's caches for the device made anew (to compile again): the kernel found is no longer its.
    if found is None or found[2] is not kernel.device_caches.get(device):
        compiled = kernel.run(*args, grid=grid, warmup=False, **meta)
        # (A compile still under way, under Triton's asynchronous mode, is looked up again next time.)
        if key is not None and compiled is not None and not hasattr(compiled, "result") and site.lays_out(args, meta):
            if len(site.compiled) >= _PER_SITE:
                site.compiled.clear()
            site.compiled[key] = (compiled, site.tail(meta), kernel.device_caches[device])
        return
    compiled, tail, _ = found
    stream = active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def _triton_decides(kernel) -> bool:
    """Whether this launch needs Triton's own: a launch hook that calls something (a profiler's), a
    pre-run hook, a kernel made with `debug`, or the compiler-stage hook (Triton 3.9 adds its hash to
    the compiled kernel's key)."""
    runtime = knobs.runtime
    return bool(
        _hooked(runtime.launch_enter_hook)
        or _hooked(runtime.launch_exit_hook)
        or kernel.pre_run_hooks
        or kernel.debug
        or getattr(runtime, "add_stages_inspection_hook", None) is not None
    )
