"""A model larger than the budget, pruned with one block resident (issue 28 item 6): a benchmark, not a test.

    python -m prunelab.benchmarks.big_model --folder /tmp/big-llama --output /tmp/big-runs [--methods bi flap taylor laco]

1. builds a random-init Llama-layout model (GQA; default hidden 2048, 24 layers, 16 query / 4 KV heads,
   intermediate 5632, vocab 32000, untied head: 1.21B parameters, 4.85 GB in float32) WITHOUT ever holding it: the
   config on the meta device gives every tensor's name and shape, each tensor is drawn (seeded by its name) and
   written straight into pre-allocated safetensors shards (``prunelab.stages.io.streaming.ShardWriter``), with a
   byte-level tokenizer (no download);
2. prunes 20% of it with each method, each in its own ``python pipeline/run.py`` child, ``model.load: streaming``,
   calibration ``pipeline: sequential`` on N windows of L tokens of tests/data/tiny_corpus.txt (default 8 × 128):
   ``bi`` (ShortGPT Block Influence, 20% of the blocks), ``flap`` (FLAP, global allocation, optimal compensation),
   ``taylor`` (LLM-Pruner element-wise Taylor, uniform widths, block-wise backward), ``laco`` (LaCo, C = 3 layers
   merged per kept trial, T = 0.2, 20% of the blocks: trials from the checkpointed dense boundary states, the export
   replaying the merges); ``--resident`` also runs each method with the whole model in memory (``load: resident``,
   ``pipeline: full``), the reference for the peak RSS (rows ``<method> (resident)``); ``--hidden``,
   ``--intermediate``, ``--heads``, ``--kv-heads`` and ``--layers`` size the model (e.g. the 0.8 GB one of
   docs/calibration.md's LaCo numbers: ``--layers 12 --hidden 1024 --intermediate 2816``);
3. reports per method: the model's float32 size, the child's peak RSS (``os.wait4``'s ``ru_maxrss``: the most
   resident memory the process ever held, file-backed pages included) and its ratio to the size, seconds per block
   (the whole child's wall time / blocks, and the export's own), the output's size, and whether the result reloads
   (a second child: vanilla ``AutoModelForCausalLM.from_pretrained`` for uniform plans, ``load_pruned`` for
   per-layer widths, then one forward with finite logits). A table on stdout, everything in ``<output>/big_model.json``;
4. with ``--evaluate SHARE``: each export's perplexity (``--eval-tokens`` of the corpus in windows of
   ``--eval-seq-len``) in a third child with ``model.load: offload`` and ``memory_budget_gb`` = SHARE × its float32
   size (``prunelab.stages.io.offload``): peak RSS, seconds, the bytes left on disk.

The machine is shared: the timings are what they are; the RSS is the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.streaming import ShardWriter, output_spec
from prunelab.stages.io.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "tiny_corpus.txt"


def build(folder: Path, hidden: int = 2048, layers: int = 24, heads: int = 16, kv_heads: int = 4,
          intermediate: int = 5632, vocab: int = 32000, shard_mb: float = 1024, seed: int = 0) -> dict[str, Any]:
    """The random model's folder (``save_pretrained`` layout), one tensor in memory at a time."""
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                                  eos_token_id=1, pad_token_id=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spec = output_spec(model, torch.float32)
    adapter = adapter_for(model)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, spec, int(shard_mb * 2**20))
    for k, (name, (shape, dtype)) in enumerate(spec.items()):
        g = torch.Generator().manual_seed(seed * 100_003 + k)
        if len(shape) == 1:  # norms: around 1, so blocks differ
            t = 1 + 0.1 * torch.randn(shape, generator=g, dtype=dtype)
        else:  # std 0.02 makes near-identical blocks; widen with depth so the criteria see differences
            block = adapter.block_index(name) or 0
            t = torch.randn(shape, generator=g, dtype=dtype) * (0.02 + 0.01 * (block % 3))
        writer.write(name, t)
        del t
    written = writer.close()
    config.dtype = torch.float32
    config.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    params = sum(int(torch.Size(s).numel()) for s, _ in spec.values())
    return {"params": params, "bytes": written["bytes"], "shards": written["shards"], "layers": layers}


METHODS = ("bi", "flap", "taylor", "laco")


def recipe(method: str, folder: Path, samples: int, seq_len: int, resident: bool = False) -> dict[str, Any]:
    """The streamed recipe of one method (20% of the parameters); ``resident``: the same with the whole model in
    memory and the full pipeline (the reference the streamed run's memory is compared with)."""
    pipeline = {"type": "full"} if resident else {"type": "sequential", "propagate": "dense"}
    calibrate = {"type": "calibrate", "source": {"path": str(CORPUS)}, "num_samples": samples, "seq_len": seq_len,
                 "pipeline": pipeline}
    if method == "bi":
        prune = {"score": {"type": "score", "criteria": ["block_influence"]},
                 "prune": {"type": "prune", "criterion": "block_influence", "ratio": 0.2}}
    elif method == "flap":
        prune = {"score": {"type": "score", "units": "width", "criteria": ["flap"]},
                 "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2,
                           "allocation": "global", "compensation": "optimal"}}
    elif method == "taylor":
        prune = {"score": {"type": "score", "units": "width", "criteria": ["taylor"]},
                 "prune": {"type": "prune", "units": "width", "criterion": "taylor", "ratio": 0.2}}
    elif method == "laco":  # T = 0.2: merges of a random model's blocks are kept (the similarities are low)
        prune = {"score": {"type": "score", "criteria": ["laco"],
                           "settings": {"laco": {"merge_layers": 3, "threshold": 0.2}}},
                 "prune": {"type": "prune", "criterion": "laco", "ratio": 0.2}}
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = {"source": str(folder)} if resident else {"source": str(folder), "load": "streaming"}
    return {"name": f"big-{method}" + ("-resident" if resident else ""), "seed": 0, "model": model,
            "stages": {"calibrate": calibrate, **prune, "export": {"type": "export", "shard_mb": 1024}}}


def child(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS in bytes) of one child process."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux: KiB


RELOAD = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
path = sys.argv[1]
per_layer = bool(getattr(AutoConfig.from_pretrained(path), "prunelab_layer_shapes", None))
if per_layer:
    from prunelab.stages.io.loader import load_pruned
    model = load_pruned(path)
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
with torch.inference_mode():
    logits = model(torch.arange(3, 35)[None]).logits
print(json.dumps({"loader": "load_pruned" if per_layer else "vanilla", "finite": bool(torch.isfinite(logits).all()),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def run_method(method: str, folder: Path, output: Path, samples: int, seq_len: int, size: int,
               layers: int, resident: bool = False) -> dict[str, Any]:
    """One method: the streamed run (``resident``: the whole-model reference) in a child, then the reload in another."""
    runs = output / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    spec = recipe(method, folder, samples, seq_len, resident)
    name = spec["name"]
    path = output / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, wall, rss = child([sys.executable, "pipeline/run.py", str(path), "--output-dir", str(runs), "--force"],
                            output / f"{name}.log")
    row: dict[str, Any] = {"method": method + (" (resident)" if resident else ""), "exit": code, "wall_s": round(wall, 1),
                           "peak_rss_bytes": rss, "rss_over_size": round(rss / size, 4),
                           "seconds_per_block": round(wall / layers, 2)}
    model_dir = runs / name / "model"
    if code != 0 or not model_dir.is_dir():
        row["error"] = (output / f"{name}.log").read_text()[-2000:]
        return row
    metrics = json.loads((runs / name / "metrics.json").read_text())
    row["params_after"] = metrics["model"].get("params_after")
    row["layers_after"] = metrics["model"].get("layers_after")
    row["output_bytes"] = size_of(model_dir)
    done = sorted((runs / name).glob("*-export/done.json"))
    if done:
        streamed = json.loads(done[-1].read_text()).get("outputs", {}).get("streamed", {})
        row["export_seconds_per_block"] = streamed.get("seconds_per_block")
    scores = sorted((runs / name).glob("*-score/scores.json"))
    if method == "laco" and scores:  # the plan, to compare the streamed run with the resident one
        row["merges"] = [(m["into"], m["from"]) for m in json.loads(scores[-1].read_text())["laco"].get("merges", [])]
    rcode, _, rrss = child([sys.executable, "-c", RELOAD, str(model_dir)], output / f"reload-{name}.log")
    tail = (output / f"reload-{name}.log").read_text().strip().splitlines()
    row["reload"] = json.loads(tail[-1]) if rcode == 0 and tail else {"error": "\n".join(tail[-5:])}
    row["reload_ok"] = rcode == 0 and row["reload"].get("finite", False)
    return row


def evaluate_offloaded(method: str, model_dir: Path, output: Path, share: float | None, tokens: int, seq_len: int,
                       batch_size: int) -> dict[str, Any]:
    """Perplexity of the exported model in a child with ``model.load: offload`` and a memory budget of ``share`` of
    its float32 size (the rest read from the shards per forward): peak RSS, seconds, placement. ``share`` None: the
    same evaluation with ``load: resident`` (the whole model in memory), the reference."""
    size = size_of(model_dir)
    name = f"eval-{method}" + ("" if share is not None else "-resident")
    model: dict[str, Any] = {"source": str(model_dir)}
    if share is not None:
        model |= {"load": "offload", "memory_budget_gb": round(share * size / 2**30, 4)}
    stage = {"type": "evaluate", "label": "pruned", "perplexity": {"corpus": {
        "source": {"path": str(CORPUS)}, "seq_len": seq_len, "max_tokens": tokens, "batch_size": batch_size}}}
    path = output / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, "model": model, "stages": {"evaluate": stage}},
                                   sort_keys=False))
    code, wall, rss = child([sys.executable, "pipeline/run.py", str(path), "--output-dir", str(output / "runs"),
                             "--force"], output / f"{name}.log")
    row: dict[str, Any] = {"exit": code, "wall_s": round(wall, 1), "peak_rss_bytes": rss, "model_bytes": size,
                           "budget_bytes": int(model.get("memory_budget_gb", size / 2**30) * 2**30),
                           "rss_over_size": round(rss / size, 4)}
    done = sorted((output / "runs" / name).glob("*-evaluate/done.json"))
    if code != 0 or not done:
        row["error"] = (output / f"{name}.log").read_text()[-2000:]
        return row
    outputs = json.loads(done[-1].read_text())["outputs"]
    results = json.loads((done[-1].parent / "results.json").read_text())["results"]["corpus"]
    row.update(ppl=outputs["corpus"], tokens=results["tokens"], windows=results["windows"],
               offload=outputs.get("offload", {"disk_bytes": 0}), stage_s=json.loads(done[-1].read_text()).get("seconds"))
    return row


def table(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    gb = 1e9
    lines = [f"model: {info['params'] / 1e9:.2f}B params, {info['bytes'] / gb:.2f} GB float32, {info['layers']} blocks, "
             f"{info['shards']} shards; calibration {info['samples']} × {info['seq_len']} tokens, sequential",
             "| method | peak RSS (GB) | RSS / f32 size | s / block (run) | s / block (export) | params after | "
             "output (GB) | reload |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['method']} | {r['peak_rss_bytes'] / gb:.2f} | failed (exit {r['exit']}) | | | | | |")
            continue
        reload = f"{r['reload'].get('loader', '?')} ok" if r["reload_ok"] else "FAILED"
        lines.append(f"| {r['method']} | {r['peak_rss_bytes'] / gb:.2f} | {r['rss_over_size']:.1%} | "
                     f"{r['seconds_per_block']} | {r.get('export_seconds_per_block')} | {r['params_after']:,} | "
                     f"{r['output_bytes'] / gb:.2f} | {reload} |")
    evals = [(f"{r['method']} ({key.removeprefix('evaluate').strip('_') or 'offload'})", r[key])
             for r in rows for key in ("evaluate", "evaluate_resident") if key in r]
    if evals:
        lines += ["", "| export evaluated | evaluated (GB f32) | budget | peak RSS (GB) | RSS / evaluated | RSS / source | "
                  "on disk (GB) | tokens (windows) | wall (s) | PPL |", "|---|---|---|---|---|---|---|---|---|---|"]
        for label, e in evals:
            if e["exit"] != 0:
                lines.append(f"| {label} | | | {e['peak_rss_bytes'] / gb:.2f} | failed (exit {e['exit']}) | | | | | |")
                continue
            lines.append(f"| {label} | {e['model_bytes'] / gb:.2f} | {e['budget_bytes'] / gb:.2f} GB | "
                         f"{e['peak_rss_bytes'] / gb:.2f} | {e['rss_over_size']:.1%} | "
                         f"{e['peak_rss_bytes'] / info['bytes']:.1%} | {e['offload']['disk_bytes'] / gb:.2f} | "
                         f"{e['tokens']} ({e['windows']}) | {e['wall_s']} | {e['ppl']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/prunelab-big-llama"), help="where the model is built")
    p.add_argument("--output", type=Path, default=Path("/tmp/prunelab-big-runs"), help="runs, logs and the JSON")
    p.add_argument("--methods", nargs="+", default=["bi", "flap", "taylor"], choices=METHODS)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--resident", action="store_true", help="also run each method with the whole model in memory "
                   "(load: resident, pipeline: full): the reference for the streamed run's peak RSS")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--keep", action="store_true", help="keep the built model and the runs (default: delete them)")
    p.add_argument("--evaluate", type=float, default=None, metavar="SHARE",
                   help="also evaluate each export with model.load: offload and a memory budget of SHARE of its float32 "
                   "size (e.g. 0.15), in its own child: perplexity, peak RSS, seconds")
    p.add_argument("--eval-resident", action="store_true", help="with --evaluate: also the same evaluation with the "
                   "whole export in memory (load: resident), the reference for the perplexity, memory and seconds")
    p.add_argument("--eval-tokens", type=int, default=2048, help="perplexity tokens of tests/data/tiny_corpus.txt")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4, help="windows per forward (each forward reads the disk part once)")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if not (args.folder / "config.json").is_file():
        t0 = time.perf_counter()
        info = build(args.folder, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                     intermediate=args.intermediate)
        info["build_s"] = round(time.perf_counter() - t0, 1)
    else:
        cfg = json.loads((args.folder / "config.json").read_text())
        size = size_of(args.folder)
        info = {"params": size // 4, "bytes": size, "layers": cfg["num_hidden_layers"],
                "shards": len(list(args.folder.glob("*.safetensors")))}
    info.update(samples=args.samples, seq_len=args.seq_len)
    rows = []
    for method in args.methods:
        if args.resident:
            rows.append(run_method(method, args.folder, args.output, args.samples, args.seq_len, info["bytes"],
                                   info["layers"], resident=True))
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(args.output / "runs" / f"big-{method}-resident" / "model", ignore_errors=True)
        rows.append(run_method(method, args.folder, args.output, args.samples, args.seq_len, info["bytes"], info["layers"]))
        model_dir = args.output / "runs" / f"big-{method}" / "model"
        if args.evaluate is not None and rows[-1]["exit"] == 0 and model_dir.is_dir():
            rows[-1]["evaluate"] = evaluate_offloaded(method, model_dir, args.output, args.evaluate, args.eval_tokens,
                                                      args.eval_seq_len, args.eval_batch)
            if args.eval_resident:
                rows[-1]["evaluate_resident"] = evaluate_offloaded(method, model_dir, args.output, None, args.eval_tokens,
                                                                   args.eval_seq_len, args.eval_batch)
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:  # the disk is shared: one pruned copy at a time
            shutil.rmtree(args.output / "runs" / f"big-{method}" / "model", ignore_errors=True)
    out = {"model": info, "rows": rows}
    (args.output / "big_model.json").write_text(json.dumps(out, indent=2) + "\n")
    print(table(info, rows))
    if not args.keep:
        shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
