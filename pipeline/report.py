"""``report.md`` + ``plots/*.png`` in the run directory: what a person reads after a run.

Plots (matplotlib, headless): per-block importance for every depth criterion scored, kept widths per
layer for a width plan, every evaluation (dense / pruned / recovered / control) side by side, and
the recovery loss curve. Each plot is written only when the run produced its data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunelab.rundir import atomic_write_text
from prunelab.stages.evaluation.describe import describe_result


def _plt() -> Any:
    import matplotlib  # lazy: startup

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: startup

    return plt


def plot_block_scores(scores: dict[str, dict[str, Any]], path: Path) -> bool:
    rows = {n: r["scores"] for n, r in scores.items() if isinstance(r.get("scores"), list) and r["scores"]
            and all(isinstance(v, (int, float)) or v is None for v in r["scores"])}
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.8 * len(rows) + 0.6), squeeze=False)
    for ax, (name, vals) in zip(axes[:, 0], rows.items()):
        ax.bar(range(len(vals)), [v if v is not None else 0.0 for v in vals], color="tab:blue")
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("block (0-based); higher = more important")
    fig.suptitle("Per-block importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_widths(plan: dict[str, Any], path: Path) -> bool:
    if not plan or plan.get("kind") != "width" or plan.get("hidden"):
        return False  # hidden-channel plans keep every layer's heads and channels
    plt = _plt()
    before, after = plan["shapes_before"], plan["shapes_after"]
    keys = [("num_attention_heads", "query heads"), ("num_key_value_heads", "KV heads"), ("intermediate_size", "MLP channels")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, (k, title) in zip(axes, keys):
        ax.bar(range(len(before)), [s[k] for s in before], color="lightgray", label="before")
        ax.bar(range(len(after)), [s[k] for s in after], color="tab:orange", label="kept")
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_alpha(plan: dict[str, Any], path: Path) -> bool:
    """AlphaPruning: each layer's heavy-tail exponent α and the ratio offset it earned."""
    alphas = (plan or {}).get("layer_alpha")
    if not alphas:
        return False
    plt = _plt()
    offs = plan.get("layer_ratio_offsets") or [0.0] * len(alphas)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    axes[0].bar(range(len(alphas)), alphas, color="tab:purple")
    axes[0].set_title("Hill α of the weight spectra (mean over the layer's matrices)")
    axes[1].bar(range(len(offs)), offs, color="tab:red")
    axes[1].set_title("layer ratio offset (lower α → pruned less)")
    for ax in axes:
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_evals(evals: dict[str, dict[str, Any]], path: Path) -> bool:
    ppl = [(label, name, r["ppl"]) for label, res in evals.items() for name, r in res.items() if "ppl" in r]
    if not ppl:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(ppl)), 3))
    ax.bar(range(len(ppl)), [p for *_, p in ppl], color="tab:green")
    ax.set_xticks(range(len(ppl)), [f"{lab}\n{n}" for lab, n, _ in ppl], fontsize=8)
    for i, (*_, p) in enumerate(ppl):
        ax.text(i, p, f"{p:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_losses(run_dir: Path, path: Path) -> bool:
    curves = [json.loads(f.read_text()) for f in sorted(run_dir.glob("*-*/loss.json")) + sorted(run_dir.glob("*-*/control/loss.json"))]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    for c in curves:
        ax.plot(c["steps"], c["loss"], label=c["label"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: Path, metrics: dict[str, Any], scores: dict[str, Any], plan: Any = None) -> Path:
    """Render every plot this run has data for and a markdown page around them and the metrics (``plan``: the
    typed plan of ``prunelab.stages.surgery.plan``, described by its own ``describe()`` and ``details()``)."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    data = plan.to_json() if plan is not None else {}
    made = {
        "block_importance": plot_block_scores(scores, plots / "block_importance.png"),
        "widths": plot_widths(data, plots / "widths.png"),
        "alpha": plot_alpha(data, plots / "alpha.png"),
        "evaluation": plot_evals(metrics["eval"], plots / "evaluation.png"),
        "loss": plot_losses(run_dir, plots / "loss.png"),
    }
    m = metrics["model"]
    lines = [f"# {metrics['recipe']}", "",
             (f"Model `{m['source']}`: {m['params_before']:,} → {m['params_after']:,} parameters, "
              f"{m['layers_before']} → {m['layers_after']} blocks."), ""]
    if plan is not None:
        lines += ["## Plan", "", plan.describe(), ""] + ([*plan.details(), ""] if plan.details() else [])
    if metrics["eval"]:
        lines += ["## Evaluation", "", "| model | what | result | protocol |", "|---|---|---|---|"]
        for label, res in metrics["eval"].items():
            for name, r in res.items():
                lines.append(f"| {label} | {name} | {describe_result(r)} | {r.get('protocol', '')} |")
        lines.append("")
    if metrics.get("recover"):
        lines += ["## Recovery", "", "| model | steps | loss first → last | tokens/s | vs plain peft loop | peak memory MB |",
                  "|---|---|---|---|---|---|"]
        for label, r in metrics["recover"].items():
            ratio = r.get("tokens_per_s_ratio_vs_plain")
            lines.append(f"| {label} | {r['steps']} | {r['first_loss']:.4f} → {r['final_loss']:.4f} | {r['tokens_per_s']} | "
                         f"{f'{ratio:.2f}×' if ratio else '—'} | {r['peak_memory_mb']['cpu_rss'] if r['peak_memory_mb']['gpu'] is None else r['peak_memory_mb']['gpu']} |")
        lines.append("")
    titles = {"block_importance": "Per-block importance", "widths": "Kept widths per layer", "alpha": "AlphaPruning allocation",
              "evaluation": "Perplexity", "loss": "Recovery loss"}
    for key, ok in made.items():
        if ok:
            lines += [f"## {titles[key]}", "", f"![{titles[key]}](plots/{key}.png)", ""]
    lines += ["## Timing (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in metrics["timing_s"].items() if v), ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
