"""Run fastseq under the real `deepspeed` launcher: two ranks on the CPU (gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference",
                OMP_NUM_THREADS="1")  # fmt: skip


def _check(procs: list, port: int, expect_fail: bool) -> None:
    left = shared_memory_left(port)
    for buffer in left:  # removed first, so that a failing run does not fill /dev/shm either
        buffer.unlink()
    if not expect_fail:  # a rank stopped by the launcher before it released its buffer may leave one
        assert not left, f"the run left DeepSpeed's all-reduce buffers in /dev/shm: {left}"
    for proc in procs:
        if expect_fail:
            assert proc.returncode != 0, proc.stdout[-2000:]
        else:
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def deepspeed(*args: str, ranks: int = 2, module: str | None = "fastseq.train", expect_fail: bool = False,
              prefix: tuple[str, ...] = ()):  # fmt: skip
    """`[PREFIX] deepspeed --num_gpus RANKS [--module MODULE] ARGS...`; returns the finished process."""
    port = free_port()
    cmd = [*prefix, sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(port)]  # fmt: skip
    cmd += ["--module", module, *args] if module else list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    _check([proc], port, expect_fail)
    return proc


def own_disks_prefix(path: Path, disk: Path) -> list[str]:
    """A command prefix that runs the command in a mount namespace of its own where `path` is
    `disk`: a node's own disk mounted at the output directory every node names, on this machine.
    Unprivileged, through a user namespace (`unshare --user --map-root-user`)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(disk), str(path)]  # fmt: skip


def own_disks_available() -> str | None:
    """Why `own_disks_prefix` cannot run here (None when it can)."""
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        proc = subprocess.run([*own_disks_prefix(probe, probe), "true"], capture_output=True, text=True, timeout=60)
    except OSError as err:
        return f"unshare: {err}"
    return None if proc.returncode == 0 else f"no mount namespace here: {proc.stderr.strip()}"


def deepspeed_nodes(hostfile: Path, *args: str, nodes: int = 2, expect_fail: bool = False,
                    disks: tuple[Path, Path] | None = None, timeout: int = 900) -> list:  # fmt: skip
    """`deepspeed --hostfile HOSTFILE --no_ssh --num_nodes NODES --node_rank R --master_addr 127.0.0.1
    --module fastseq.train ARGS...` for every R at once, one rank per node: the launchers a SLURM or
    Kubernetes job starts, one per node, here all on this machine. `disks`: (the --output-dir ARGS
    name, one directory per node): each node's launcher sees its own directory there, as a node sees
    its own disk (`own_disks_prefix`). Returns the finished processes."""
    port = free_port()
    hostfile.write_text("".join(f"node{n} slots=1\n" for n in range(nodes)))
    launchers = []
    for node in range(nodes):
        prefix = own_disks_prefix(disks[0], disks[1][node]) if disks else []
        cmd = [*prefix, sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--num_nodes", str(nodes), "--num_gpus", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--module", "fastseq.train", *args]  # fmt: skip
        launchers.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))  # fmt: skip
    procs = []
    for launcher in launchers:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in launchers:  # each launcher and its ranks: a session of their own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            raise AssertionError(f"the launchers did not finish in {timeout} s: a rank waits for another") from None
        procs.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    _check(procs, port, expect_fail)
    return procs


def shared_memory_left(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of the run on `port`."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line and "eval_loss" not in line]


@contextmanager
def zero3_grouping():
    """Every module's positional inputs and its outputs pass through an identity autograd function,
    as DeepSpeed's ZeRO-3 hooks pass them (`PostBackwardFunctionModule`, `PreBackwardFunctionForModule`,
    through its own `apply_to_tensors_only`), so that autograd groups its gradient sums as under ZeRO-3.

    Why: a tensor used inside a module and outside it (the residual stream, an RMS norm's input used
    twice inside; the encoder's output, read by every cross-attention's k and v) gets its gradient
    summed inside the module first under ZeRO-3, and in arrival order in one process. Those fp32 sums
    differ in the last bit: one micro-batch's gradients of the default model differ in 46 of its 52
    parameters, by up to 7e-7 relative, on one rank as on two. With these functions the gradients are
    ZeRO-3's bit for bit (reduce-scatter over two ranks adds two values and halves exactly)."""
    import torch
    from deepspeed.runtime.zero.utils import apply_to_tensors_only
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.detach()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad

    hooks = [
        register_module_forward_pre_hook(lambda module, inputs: apply_to_tensors_only(Identity.apply, inputs)),
        register_module_forward_hook(lambda module, inputs, output: apply_to_tensors_only(Identity.apply, output)),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def one_process(output_dir: Path, steps: int, model=None, zero3: bool = False, **options) -> list[float]:
    """The losses of `fastseq train` in this process with two micro-batches of 4 accumulated: what
    two data-parallel ranks with one micro-batch each (or a two-stage pipeline accumulating two)
    must reproduce. `zero3`: autograd sums the gradients as under ZeRO-3 (`zero3_grouping`)."""
    import torch

    from fastseq.train import TrainArgs, train

    # AdamW and the built-in task unless the options say otherwise
    options = {"optimizer": "adamw", "lr": 1e-3, "data": "synthetic", **options}
    args = TrainArgs(model=None if model is None else str(model), steps=steps, batch_size=4, grad_accum=2,
                     quiet=True, max_eval_samples=0, output_dir=str(output_dir), device="cpu", **options)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): the same matmul blocking, the same rounding
    try:
        with zero3_grouping() if zero3 else nullcontext():
            train(args)
    finally:
        torch.set_num_threads(threads)
    return losses(output_dir)


def assert_losses_close(got: list[float], expected: list[float], rel: float = 1e-5) -> float:
    """Each step's loss within `rel` of one process's; returns the largest relative difference."""
    assert len(got) == len(expected)
    worst = 0.0
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= rel * abs(b), f"step {step + 1}: {a} vs one process {b}"
        worst = max(worst, abs(a - b) / abs(b))
    return worst
