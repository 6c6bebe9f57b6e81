"""Run the OFFICIAL LLM-Pruner algorithm on the calibration windows of one of our runs and compare the plans.

    python -m prunelab.benchmarks.compare_llm_pruner runs/smollm2-llm-pruner-official-20 --official /path/to/LLM-Pruner

A tool, not part of the frame, and the one place prunelab imports code from OUTSIDE its own dependencies: it needs
a checkout of the official repository, named on the command line. ``--official`` is a checkout of horseee/LLM-Pruner (commit 128a07d; only its ``LLMPruner`` package is imported: the
vendored torch-pruning fork and ``hf_llama_pruner.TaylorImportance``). The run must be a width run of our
``taylor`` criterion with the parity options (``recipes/smollm2/llm-pruner-official-20.yaml``); its recipe gives
the model, the layer range and the ratio. This script does what the official ``llama3.py --block_wise`` path does
(lines 95–160 there): a ``MetaPruner`` rooted at every ``k_proj`` and ``gate_proj`` of the layer range, Taylor
``param_first`` with group reduction ``sum``, KV heads as ``consecutive_groups`` of ``head_dim``, local pruning at
``--pruning_ratio``, ONE forward+backward of ``model(x, labels=x).loss`` on all windows — but on the windows our
calibrate stage saved (``NN-calibrate/calibration.pt``), with eager attention so repeat_kv's ``expand`` is traced
(docs/llm-pruner-parity.md, "A caveat on the official tracer"). It prints, per layer, whether the KV groups and
MLP channels the official code removes are the ones in our ``plan.json``, then scores the official model with our
perplexity protocol (the run's first perplexity evaluation) and writes ``compare-llm-pruner.json`` in the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from prunelab.stages.arch import adapter_for
from prunelab.stages.evaluation.perplexity import protocol, windowed_perplexity
from prunelab.stages.io.config import ModelConfig, TextSource
from prunelab.stages.io.models import load_model
from prunelab.stages.io.text import tokenized_source


def _stage_dir(run: Path, kind: str) -> Path:
    found = sorted(p for p in run.iterdir() if p.is_dir() and p.name.split("-", 1)[-1] == kind)
    if not found:
        raise SystemExit(f"{run}: no finished `{kind}` stage folder (NN-{kind}/)")
    return found[0]


def official_plan(model: Any, windows: torch.Tensor, official: Path, layers: range, ratio: float) -> dict[str, Any]:
    """The official MetaPruner's removed KV heads / MLP channels per layer (the model is pruned in place)."""
    sys.path.insert(0, str(official))
    import LLMPruner.torch_pruning as tp  # lazy: optional
    from LLMPruner.pruner import hf_llama_pruner as llama_pruner  # lazy: optional

    ad = adapter_for(model)  # the official code names the Llama modules; we ask the adapter for the same ones
    blocks = ad.layers
    hd = ad.geometry(blocks[0]).head_dim
    roots = {ad.linear(blocks[i], "k"): (i, "kv_heads") for i in layers}
    roots.update({ad.linear(blocks[i], "gate"): (i, "mlp") for i in layers})
    model.config._attn_implementation = "eager"
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(
        model, windows[:2, :16], importance=llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first"),
        global_pruning=False, iterative_steps=1, ch_sparsity=ratio, ignored_layers=[], channel_groups={},
        consecutive_groups={ad.linear(b, "k"): hd for b in blocks},
        customized_pruners={LlamaRMSNorm: llama_pruner.hf_rmsnorm_pruner}, root_module_types=None,
        output_transform=lambda o: o.logits, root_instances=list(roots))
    model.zero_grad()
    model(windows, labels=windows).loss.backward()
    plan: dict[str, Any] = {}
    for group in pruner.step(interactive=True):
        dep, idxs = group[0][0], group[0][1]
        index, unit = roots[dep.target.module]
        entry = plan.setdefault(str(index), {})
        entry[unit] = sorted({i // hd for i in idxs}) if unit == "kv_heads" else sorted(idxs)
        group.prune()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory of our LLM-Pruner recipe")
    p.add_argument("--official", type=Path, required=True, help="checkout of horseee/LLM-Pruner (its LLMPruner/)")
    args = p.parse_args(argv)
    if not (args.official / "LLMPruner" / "torch_pruning").is_dir():
        raise SystemExit(f"--official {args.official}: no LLMPruner/torch_pruning inside; pass the repository root")
    warnings.filterwarnings("ignore")
    recipe = yaml.safe_load((args.run / "recipe.resolved.yaml").read_text())
    saved = json.loads((_stage_dir(args.run, "prune") / "plan.json").read_text())  # the plan records its target
    prune = saved.get("target") or {}
    if saved.get("kind") != "width" or saved.get("criterion") != "taylor" or prune.get("layer_ratio") is None:
        raise SystemExit("the run must prune width by `taylor` with `layer_ratio:` (the official --pruning_ratio)")
    start, end = prune.get("layers") or [0, None]
    model, tok = load_model(ModelConfig(**recipe["model"]))
    layers = range(start, end if end is not None else adapter_for(model).num_blocks)
    windows = torch.load(_stage_dir(args.run, "calibrate") / "calibration.pt", weights_only=True)
    official = official_plan(model, windows, args.official, layers, prune["layer_ratio"])
    ours = saved["layers"]
    same = {k: {u: official[k].get(u) == ours[k][u] for u in ("kv_heads", "mlp")} for k in official}
    params = sum(t.numel() for t in model.parameters())
    ppl_cfg = next(c for s in recipe["stages"].values() if s["type"] == "evaluate" for c in s.get("perplexity", {}).values())
    ids = tokenized_source(tok, TextSource(**ppl_cfg["source"]))
    with torch.no_grad():
        ppl = windowed_perplexity(model, ids, ppl_cfg["seq_len"], ppl_cfg.get("max_tokens"), 4, True, "official model")
    ppl["protocol"] = protocol(str(ppl_cfg["source"].get("path")), ppl_cfg["seq_len"], ppl["tokens"], ppl["windows"])
    ours_ppl = json.loads((args.run / "metrics.json").read_text())["eval"]["pruned"]
    report = {"run": str(args.run), "layers": list(layers), "ratio": prune["layer_ratio"],
              "identical_kv_layers": sum(v["kv_heads"] for v in same.values()),
              "identical_mlp_layers": sum(v["mlp"] for v in same.values()), "pruned_layers": len(same),
              "official_params": params, "official_ppl": ppl["ppl"], "protocol": ppl["protocol"],
              "ours": {"params": json.loads((args.run / "metrics.json").read_text())["model"]["params_after"],
                       "ppl": {k: v["ppl"] for k, v in ours_ppl.items()}},
              "official_plan": official}
    (args.run / "compare-llm-pruner.json").write_text(json.dumps(report, indent=2))
    print(f"layers {start}..{layers.stop - 1}: identical KV groups in {report['identical_kv_layers']}/{len(same)}, "
          f"identical MLP channel sets in {report['identical_mlp_layers']}/{len(same)}")
    for k, v in same.items():
        if not all(v.values()):
            print(f"  layer {k}: official kv {official[k].get('kv_heads')} vs ours {ours[k]['kv_heads']}; MLP "
                  f"channels only one side removes: {sorted(set(official[k].get('mlp', [])) ^ set(ours[k]['mlp']))}")
    print(f"official code: {params:,} params, PPL {ppl['ppl']:.4f}; ours: {report['ours']['params']:,} params, "
          f"PPL {report['ours']['ppl']}")
    print(f"protocol: {ppl['protocol']}")
    return 0 if all(all(v.values()) for v in same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
