"""Plots, drawn with matplotlib (imported lazily, headless)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (a missing matplotlib is one line saying what to install)."""
    from d2mc.errors import require_module

    matplotlib = require_module("matplotlib", "plotting", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and release it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return Path(path)


def plot_roofline(result: dict, path: str | Path) -> Path:
    """The device roofline with every operator of both phases placed on it (attainable FLOP/s vs intensity)."""
    plt = pyplot()
    profile = result["profile"]
    bandwidth = profile["achievable_bandwidth_gbps"] * 1e9
    peak = profile["achievable_tflops"] * 1e12
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [10 ** (i / 10) for i in range(-20, 50)]
    ax.plot(xs, [min(peak, x * bandwidth) for x in xs], color="black", label=f"{profile['name']} roof")
    markers = {"prefill": "o", "decode": "x"}
    for phase, data in result["phases"].items():
        by_op: dict[str, list] = {}
        for op in data["ops"]:
            if op["flops"] and op["bytes"] and op["seconds"]:
                by_op.setdefault(op["op"], []).append((op["intensity"], op["flops"] / op["seconds"]))
        for name, points in by_op.items():
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=markers[phase], s=14,
                       label=f"{phase}: {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s (predicted)")
    ax.set_title(f"{result['model']} on {profile['name']}")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_redundancy(result: dict, path: str, title: str = "") -> None:
    """A PNG of the three influences per layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key in ("block", "attention", "mlp"):
        ax.plot(result[key], marker="o", markersize=3, label=f"{key} influence")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("1 - cos(in, out)")
    ax.set_title(f"redundancy {title}")
    ax.legend()
    save_figure(fig, path)


def plot_recovery_curve(summary: dict, path: str | Path) -> Path:
    """Training loss (and its CE and KL parts) against trained tokens, with held-out perplexity when scored."""
    plt = pyplot()
    curve = summary["curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [c["tokens"] for c in curve]
    for key in ("loss", "ce", "kl"):
        if any(key in c for c in curve):
            ax.plot(tokens, [c.get(key) for c in curve], marker="o", markersize=2, label=key)
    ax.set_xlabel("trained tokens")
    ax.set_ylabel("training loss")
    heldout = summary.get("heldout_curve") or []
    if heldout:
        right = ax.twinx()
        right.plot([h["tokens"] for h in heldout], [h["heldout_perplexity"] for h in heldout], color="black",
                   marker="s", markersize=3, label="held-out perplexity")
        right.set_ylabel("held-out perplexity")
        right.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"recovery: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['seconds']:.0f} s")
    return save_figure(fig, path)
