"""fastseq.optim: Adafactor and the schedules against transformers' implementations."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastseq.optim import Adafactor, Layout, make_optimizer, make_schedule, schedule_factor


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3, 4, 6), (9,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=None, relative_step=True, scale_parameter=True),
        dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
        dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1),
        dict(lr=3e-3, relative_step=False, scale_parameter=True, clip_threshold=0.5),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adafactor_matches_transformers(kwargs, dtype):
    from transformers.optimization import Adafactor as HFAdafactor

    ours, theirs = _params(dtype), _params(dtype)
    opt, ref = Adafactor(ours, **kwargs), HFAdafactor(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=g).to(dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), (a - b).abs().max()
    # The factored state is O(rows + cols): no full second-moment matrix for a 2-D parameter.
    assert "exp_avg_sq" not in opt.state[ours[0]] and opt.state[ours[0]]["exp_avg_sq_row"].shape == (7,)


def test_optimizer_choices():
    params = _params()
    assert isinstance(make_optimizer("adamw", params, lr=1e-3), torch.optim.AdamW)
    assert make_optimizer("adafactor", params, lr=None).defaults["relative_step"]
    assert not make_optimizer("adafactor", params, lr=1e-3).defaults["relative_step"]
    with pytest.raises(ValueError, match="adamw needs a learning rate"):
        make_optimizer("adamw", params, lr=None)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", params, lr=1e-3)
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor(params, lr=1e-3)


def test_schedules_match_transformers():
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_inverse_sqrt_schedule,
        get_linear_schedule_with_warmup,
    )

    def factors(make):
        opt = torch.optim.SGD(_params(), lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(60):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    warmup, total = 10, 50
    cases = {
        "constant": lambda o: get_constant_schedule_with_warmup(o, warmup),
        "linear": lambda o: get_linear_schedule_with_warmup(o, warmup, total),
        "cosine": lambda o: get_cosine_schedule_with_warmup(o, warmup, total),
        "inverse_sqrt": lambda o: get_inverse_sqrt_schedule(o, warmup),
    }
    for name, theirs in cases.items():
        ours = factors(lambda o, name=name: make_schedule(o, name, warmup_steps=warmup, total_steps=total))
        assert ours == pytest.approx(factors(theirs), rel=1e-12, abs=1e-12), name
    assert schedule_factor("linear", 50, 10, 50) == 0.0
    assert schedule_factor("cosine", 50, 10, 50) == 0.0
    with pytest.raises(ValueError, match="unknown schedule 'polynomial'"):
        make_schedule(torch.optim.SGD(_params(), lr=1.0), "polynomial", warmup_steps=0, total_steps=1)


def test_relative_step_reports_the_rate_adafactor_applies():
    """Without a learning rate, the schedule reports Adafactor's relative step size for the next step
    (before each parameter's scale), read from the optimizer's own step count: what transformers'
    Adafactor applies at that step, divided by the parameter's scale."""
    from transformers.optimization import Adafactor as HFAdafactor

    params = _params()
    optimizer = make_optimizer("adafactor", params, lr=None)
    schedule = make_schedule(optimizer, "constant", warmup_steps=0, total_steps=10)
    assert schedule.get_last_lr() == [1e-2]  # step 1: min(1e-2, 1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    schedule.step()
    for state in optimizer.state.values():  # as if 39,999 steps were done: the next one is 40,000
        state["step"] = 39_999
    reported = schedule.get_last_lr()[0]
    assert reported == 1 / 200
    optimizer.step()
    group = optimizer.param_groups[0]
    for p in group["params"]:
        state = optimizer.state[p]
        assert state["step"] == 40_000
        assert reported * max(1e-3, state["RMS"]) == pytest.approx(HFAdafactor._get_lr(group, state), rel=1e-12)


class _Ranks:
    """Ranks as threads, with a sum over them in place of torch.distributed's all-reduce."""

    def __init__(self, world: int):
        import threading

        self.barrier, self.lock, self.total = threading.Barrier(world), threading.Lock(), None

    def layout(self, rank: int, shapes, pieces):
        ranks = self

        class Shared(Layout):
            def reduce(self, values):
                ranks.barrier.wait()
                with ranks.lock:
                    ranks.total = values.clone() if ranks.total is None else ranks.total + values
                ranks.barrier.wait()
                values.copy_(ranks.total)
                if ranks.barrier.wait() == 0:
                    ranks.total = None
                ranks.barrier.wait()
                return values

        return Shared([f"p{i}" for i in range(len(shapes))], shapes, pieces, group=rank)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=None), dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1)],
)
def test_adafactor_on_flat_partitions_is_one_process_adafactor(world, kwargs):
    """The parameters laid end to end and cut into `world` flat partitions (as ZeRO-1/2 cut them:
    matrices split inside rows, a 3-D parameter, a vector), each stepped by its own Adafactor that
    knows its pieces and sums the per-matrix statistics over the ranks: bit for bit one process's
    Adafactor, with the factored state whole on every rank that holds a piece of a matrix."""
    import math
    import threading

    from fastseq.optim import Piece

    shapes = [(7, 5), (3, 4, 6), (9,), (2, 3)]
    whole = _params() + [torch.nn.Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)))]
    initial = torch.cat([p.detach().reshape(-1) for p in whole])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(initial.numel(), generator=g) for _ in range(5)]
    reference = Adafactor(whole, **kwargs)
    for grad in grads:
        for p, piece in zip(whole, grad.split([p.numel() for p in whole]), strict=True):
            p.grad = piece.view(p.shape).clone()
        reference.step()
    expected = torch.cat([p.detach().reshape(-1) for p in whole])

    offsets = [0, *itertools.accumulate(math.prod(s) for s in shapes)]
    size, ranks, results = -(-initial.numel() // world), _Ranks(world), [None] * world

    def rank(r: int) -> None:
        low, high = r * size, min(initial.numel(), (r + 1) * size)
        flat = torch.nn.Parameter(initial[low:high].clone())
        pieces = [Piece(i, max(low, offsets[i]) - offsets[i], max(low, offsets[i]) - low,
                        min(high, offsets[i + 1]) - max(low, offsets[i]))
                  for i in range(len(shapes)) if max(low, offsets[i]) < min(high, offsets[i + 1])]  # fmt: skip
        optimizer = Adafactor([flat], **kwargs)
        optimizer.spread({flat: ranks.layout(r, shapes, pieces)})
        for grad in grads:
            flat.grad = grad[low:high].clone()
            optimizer.step()
        held = {piece.index for piece in pieces}
        state = optimizer.state[flat]
        for i in held:
            if len(shapes[i]) >= 2:
                assert state[f"p{i}/exp_avg_sq_row"].shape == shapes[i][:-1]
                torch.testing.assert_close(state[f"p{i}/exp_avg_sq_row"],
                                           reference.state[whole[i]]["exp_avg_sq_row"], rtol=0, atol=0)  # fmt: skip
        results[r] = flat.detach()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result is not None for result in results)
    torch.testing.assert_close(torch.cat(results), expected, rtol=0, atol=0)
