"""The loss curve of a run, `OUTPUT/loss.png`."""

from __future__ import annotations

from pathlib import Path

from fastseq.files import atomic_write


def plot_losses(path: Path, steps: list[int], losses: list[float], evals: list[tuple[int, float]]) -> None:
    """The training loss (and eval loss) against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
