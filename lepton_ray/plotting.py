"""``lepton-ray plot``: accuracy and loss per round (and epsilon, once a job spends any)."""

from __future__ import annotations

from pathlib import Path


def plot_history(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lepton_ray.outputs import read_history

    h = read_history(out)
    has_eps = "epsilon" in h and h["epsilon"].notna().any()
    fig, axes = plt.subplots(1, 3 if has_eps else 2, figsize=(13 if has_eps else 9, 3.6))
    axes[0].plot(h["round"], h["test_accuracy"], marker=".", label="accuracy")
    axes[0].plot(h["round"], h["test_f1"], marker=".", label="macro F1")
    axes[0].set(xlabel="round", title="test accuracy", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(h["round"], h["test_loss"], marker=".", label="test")
    if "train_loss" in h and h["train_loss"].notna().any():  # blank under DP
        axes[1].plot(h["round"], h["train_loss"], marker=".", label="train")
    axes[1].set(xlabel="round", title="loss")
    axes[1].legend()
    if has_eps:
        axes[2].plot(h["round"], h["epsilon"], marker=".", color="tab:red")
        axes[2].set(xlabel="round", title="epsilon spent")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(Path(out).name)
    fig.tight_layout()
    path = Path(out) / "history.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
