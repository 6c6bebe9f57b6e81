"""vLLM CPU speed of pruned exports against the dense model: decode and prompt tokens/s, interleaved, one process.

Two steps, two venvs (vLLM pins its own torch/transformers and is not a prunelab dependency)::

    # 1. project venv: the dense model as a vLLM folder, written by the same exporter as the pruned ones
    OMP_NUM_THREADS=1 python launch/vllm_speed.py write-dense smollm2-135m /tmp/vllm-speed/dense-vllm
    # 2. vLLM venv: time it against every pruned export (a run's model-vllm/, from export formats [vllm])
    /work/vllm-venv/bin/python launch/vllm_speed.py run --dense /tmp/vllm-speed/dense-vllm \\
        depth=runs/a/model-vllm sublayer=runs/b/model-vllm --rounds 5 --out docs/results/vllm-speed/speed.json

Protocol (``run``). The dense engine stays loaded; each pruned engine is loaded in turn (one pruned ``LLM`` at a time
beside the dense one, then shut down), so memory holds two models. Engines: float32, ``enforce_eager`` (no
torch.compile), prefix caching off (a repeated prompt would otherwise skip its prefill), OpenMP threads bound to
``--cpus``. Per round, dense and pruned back to back, order alternating (A-B, B-A); one warm-up round first.
*decode* tokens/s at batch 1 = (N − 1) / (t(N tokens) − t(1 token)) on a 16-token prompt (prefill taken out);
*prompt* tokens/s = P / (t(P-token prompt, 1 token) − t(1-token prompt, 1 token)) (the fixed per-request cost taken
out). Speedup = median over rounds of the per-round ratio pruned / dense. Ideal = parameter ratio from the
safetensors headers (all, and without the embedding / head).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import struct
import time
from pathlib import Path
from typing import Any

PROMPT_TEXT = ("The history of the region begins with small farming villages along the river, whose people traded "
               "grain, salt and pottery with the hill towns to the north. ")
EMBEDDING = ("model.embed_tokens.weight", "lm_head.weight")


def write_dense(source: str, out: Path) -> None:
    """Project venv: ``source`` (float32) written by ``stages.io.export_vllm.write_vllm_export``."""
    from prunelab.stages.io.config import ModelConfig
    from prunelab.stages.io.export_vllm import write_vllm_export
    from prunelab.stages.io.models import load_model

    model, tok = load_model(ModelConfig(source=source, dtype="float32"))
    write_vllm_export(model, tok, out)
    print(f"wrote {out}")


def param_counts(model_dir: Path) -> dict[str, int]:
    """Parameters by the safetensors headers (no torch needed): all, and without the embedding and the head."""
    sizes: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                sizes[name] = n
    if not sizes:
        raise SystemExit(f"{model_dir}: no *.safetensors — pass a folder written by the vLLM export")
    total = sum(sizes.values())
    return {"params_all": total, "params_no_embedding": total - sum(sizes.get(k, 0) for k in EMBEDDING)}


def _load(model_dir: Path, args: argparse.Namespace) -> Any:
    from vllm import LLM

    remote = "auto_map" in json.loads((model_dir / "config.json").read_text())  # the DeciLM export (docs/vllm.md)
    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=args.max_model_len,
               trust_remote_code=remote, seed=0, max_num_seqs=1, enable_prefix_caching=False)


def _close(llm: Any) -> None:
    """Shut the engine core process down before the next one starts (memory holds two models at most)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  an older engine without shutdown: the garbage collector ends it
        pass
    del llm
    gc.collect()


def _timed(llm: Any, prompt_ids: list[int], tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    return time.perf_counter() - t0


def decode_tps(llm: Any, ids: list[int], n: int) -> float:
    """Batch-1 decode tokens/s on a 16-token prompt, prefill taken out: (N − 1) / (t(N) − t(1))."""
    return (n - 1) / (_timed(llm, ids[:16], n) - _timed(llm, ids[:16], 1))


def prompt_tps(llm: Any, ids: list[int]) -> float:
    """Prompt tokens/s: P / (t(P-token prompt) − t(1-token prompt)), one generated token each."""
    return len(ids) / (_timed(llm, ids, 1) - _timed(llm, ids[:1], 1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpus)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    import vllm

    specs: dict[str, Path] = {}
    for s in args.models:
        label, sep, path = s.partition("=")
        if not sep or not label or label == "dense" or label in specs:
            raise SystemExit(f"{s!r}: write LABEL=FOLDER with a label of its own (not 'dense')")
        specs[label] = Path(path)
    for d in [args.dense, *specs.values()]:
        if not (d / "config.json").is_file():
            raise SystemExit(f"{d}: no config.json — pass a folder written by the vLLM export (formats: [vllm])")
    dense = _load(args.dense, args)
    tok = dense.get_tokenizer()
    ids = tok(PROMPT_TEXT * (args.prompt_tokens // 8), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    dense_counts = param_counts(args.dense)
    result: dict[str, Any] = {
        "vllm_version": vllm.__version__, "cpus": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "rounds": args.rounds,
        "decode_tokens": args.decode_tokens, "prompt_tokens": len(ids), "dense": str(args.dense),
        "dense_params": dense_counts, "models": {},
        "protocol": (f"vLLM {vllm.__version__} CPU, float32, enforce_eager, prefix caching off, OpenMP threads bound to "
                     f"CPUs {os.environ['VLLM_CPU_OMP_THREADS_BIND']}; dense loaded once, each pruned model loaded in turn; "
                     f"per round dense and pruned back to back (order alternating), {args.rounds} rounds after 1 warm-up; "
                     f"decode: (N−1)/(t(N)−t(1)), N = {args.decode_tokens}, 16-token prompt, batch 1; prompt: "
                     f"P/(t(P)−t(1)), P = {len(ids)}; medians of per-round ratios")}
    for label, path in specs.items():
        t0 = time.perf_counter()
        llm = _load(path, args)
        load_s = time.perf_counter() - t0
        rec: dict[str, list[float]] = {"decode": [], "prompt": [], "dense_decode": [], "dense_prompt": []}
        for r in range(args.rounds + 1):  # round 0: warm-up
            pair = [("dense", dense), (label, llm)]
            res = {}
            for who, m in (pair if r % 2 else pair[::-1]):
                res[who] = (decode_tps(m, ids, args.decode_tokens), prompt_tps(m, ids))
            if r:
                rec["decode"].append(res[label][0])
                rec["prompt"].append(res[label][1])
                rec["dense_decode"].append(res["dense"][0])
                rec["dense_prompt"].append(res["dense"][1])
        _close(llm)
        counts = param_counts(path)
        out: dict[str, Any] = {"dir": str(path), "load_s": load_s, **counts, "rounds": rec,
                               "ideal_params_all": dense_counts["params_all"] / counts["params_all"],
                               "ideal_params_no_embedding": dense_counts["params_no_embedding"] / counts["params_no_embedding"]}
        for k in ("decode", "prompt"):
            ratios = [p / d for p, d in zip(rec[k], rec[f"dense_{k}"])]
            out[f"{k}_speedup"], out[f"{k}_ratio_rounds"] = statistics.median(ratios), ratios
            out[f"{k}_tok_s"], out[f"dense_{k}_tok_s"] = statistics.median(rec[k]), statistics.median(rec[f"dense_{k}"])
        result["models"][label] = out
        print(f"{label}: decode {out['decode_speedup']:.3f}× prompt {out['prompt_speedup']:.3f}× "
              f"(ideal {out['ideal_params_all']:.3f}× all params, {out['ideal_params_no_embedding']:.3f}× no embedding)",
              flush=True)
    md = table(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n" + result["protocol"] + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| model | params (no emb.) | decode tok/s (dense) | decode speedup (min–max) | prompt tok/s (dense) | "
             "prompt speedup | ideal: params all / no emb. | decode ÷ ideal (all params) |", "|---|---|---|---|---|---|---|---|"]
    for label, m in result["models"].items():
        lines.append(
            f"| {label} | {m['params_all'] / 1e6:.2f}M ({m['params_no_embedding'] / 1e6:.2f}M) | {m['decode_tok_s']:.1f} "
            f"({m['dense_decode_tok_s']:.1f}) | {m['decode_speedup']:.3f}× ({min(m['decode_ratio_rounds']):.2f}–"
            f"{max(m['decode_ratio_rounds']):.2f}) | {m['prompt_tok_s']:.0f} ({m['dense_prompt_tok_s']:.0f}) | "
            f"{m['prompt_speedup']:.3f}× | {m['ideal_params_all']:.3f}× / {m['ideal_params_no_embedding']:.3f}× | "
            f"{m['decode_speedup'] / m['ideal_params_all']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-dense", help="project venv: write the dense model as a vLLM folder")
    w.add_argument("source")
    w.add_argument("out", type=Path)
    r = sub.add_parser("run", help="vLLM venv: time every LABEL=FOLDER against --dense")
    r.add_argument("models", nargs="+", help="LABEL=FOLDER (a model-vllm/ export)")
    r.add_argument("--dense", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True, help="result JSON (a .md table is written beside it)")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--decode-tokens", type=int, default=64)
    r.add_argument("--prompt-tokens", type=int, default=256)
    r.add_argument("--cpus", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (threads fixed by the CPUs bound)")
    r.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args(argv)
    if args.cmd == "write-dense":
        return write_dense(args.source, args.out)
    if args.rounds < 1 or args.decode_tokens < 2 or args.prompt_tokens < 2:
        p.error("--rounds >= 1, --decode-tokens >= 2, --prompt-tokens >= 2")
    if args.max_model_len < args.prompt_tokens + 1:
        p.error(f"--max-model-len {args.max_model_len} < --prompt-tokens + 1")
    return run(args)


if __name__ == "__main__":
    main()
