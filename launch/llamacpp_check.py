"""Prove a prunelab model in llama.cpp (and optionally vLLM): the same logits, argmax and perplexity as transformers.

    OMP_NUM_THREADS=2 python launch/llamacpp_check.py runs/<name> --out runs/<name>/llamacpp-check.json [--vllm]

The argument is a run folder (its ``model/`` export is used, and ``recipe.resolved.yaml`` names the model source
whose GGUF tokenizer is copied) or an export folder itself (``model/``, or any folder ``load_pruned`` reads).
The model is loaded in float32 with ``prunelab.stages.io.loader.load_pruned`` and written as GGUF twice: f32 and
``--quant`` (q8_0 by default; ``--embedding-dtype`` sets token_embd / output apart, as llama-quantize's
``--token-embedding-type`` / ``--output-tensor-type`` do).

Protocol (stated in the JSON): the ``--text`` file (default WikiText-2 *test*) tokenized once as the evaluate stage
does (``stages.io.text.tokenize_text``, BOS as the tokenizer adds it), its first ``--tokens`` tokens in
non-overlapping windows of ``--window``; on every window transformers (float32) and llama.cpp (f32 KV cache,
``--threads`` threads) compute next-token logits at every position. Reported: max |Δlogit| and the share of positions
with the same argmax (f32 and the quantized file, each against transformers), and token perplexity of each engine
from those logits (mean NLL over the window − 1 predicted tokens of each window). Bars (issue 25): f32 max |Δ| ≤ 1e-2,
argmax ≥ 99%, |PPL llama.cpp / PPL transformers − 1| ≤ 0.1%, |PPL quant / PPL f32 − 1| ≤ 1%. Exit status 1 when a
bar fails.

``--vllm``: the run's ``model-vllm/`` (or one written here when vLLM runs the structure; else the refusal is
recorded) is run by ``launch/vllm_check.py`` in vLLM's own venv (``--vllm-python``): greedy continuations of its 8
fixed prompts, compared token by token with transformers' greedy decode (float32, EOS ignored) of the same prompt ids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BARS = {"f32_max_abs_diff": 1e-2, "f32_argmax_agreement": 0.99, "ppl_rel_diff": 1e-3, "quant_ppl_rel_diff": 1e-2}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="a run folder (with model/) or an export folder (with config.json)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: <work>/llamacpp-check.json)")
    p.add_argument("--work", type=Path, default=None, help="where the GGUF files go (default: <run>/llamacpp-check)")
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/wikitext2/test.txt")
    p.add_argument("--tokens", type=int, default=4096, help="first N tokens of --text")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="llama.cpp threads (torch reads OMP_NUM_THREADS)")
    p.add_argument("--quant", default="q8_0", choices=["f16", "bf16", "q8_0"], help="the quantized file's dtype")
    p.add_argument("--embedding-dtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="token_embd / output type in the quantized file (default: stages.io.gguf_export's choice "
                   "for --quant)")
    p.add_argument("--also-embedding-dtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="a third file: --quant with token_embd / output in this type, reported beside (not a bar)")
    p.add_argument("--vllm", action="store_true", help="also run the vLLM export in vLLM CPU (greedy, 8 prompts)")
    p.add_argument("--vllm-python", default=os.environ.get("PRUNELAB_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per vLLM prompt")
    args = p.parse_args(argv)
    if args.window < 2 or args.tokens < args.window:
        p.error(f"--window {args.window} / --tokens {args.tokens}: need window >= 2 and tokens >= window")
    if not args.text.is_file():
        p.error(f"--text {args.text}: no such file (WikiText-2 test lives in ../shared/data/wikitext2/test.txt)")
    if args.vllm and not Path(args.vllm_python).is_file():
        p.error(f"--vllm-python {args.vllm_python}: not found; create vLLM's venv (docs/vllm.md) or drop --vllm")
    return args


def resolve(path: Path) -> tuple[Path, Path | None]:
    """(HF export folder, run folder or None) for a run folder or an export folder."""
    if (path / "model" / "config.json").is_file():
        return path / "model", path
    if (path / "config.json").is_file():
        return path, path.parent if (path.parent / "recipe.resolved.yaml").is_file() else None
    raise SystemExit(f"{path}: neither a run folder (with model/config.json) nor an export folder (with config.json); "
                     "pass the folder a prunelab run wrote (export formats [hf])")


def tokenizer_gguf(run_dir: Path | None) -> Path | None:
    """The GGUF the run's model came from (its tokenizer fields are copied verbatim), else None."""
    if run_dir is None:
        return None
    import yaml

    from prunelab.stages.io.gguf_export import source_gguf

    model = (yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text()) or {}).get("model") or {}
    return source_gguf(model["source"], model.get("gguf_file")) if model.get("source") else None


def _nll_argmax(logits: np.ndarray, window: list[int]) -> tuple[float, np.ndarray]:
    """Summed NLL of window[1:] (float64 log-softmax) and the argmax of every position."""
    lg = logits.astype(np.float64)
    logp = lg[:-1] - np.logaddexp.reduce(lg[:-1], axis=-1, keepdims=True)
    tgt = np.asarray(window[1:])
    return -float(logp[np.arange(len(tgt)), tgt].sum()), logits.argmax(-1)


def compare(model: Any, files: dict[str, Path], windows: list[list[int]], threads: int) -> dict[str, Any]:
    """Per engine: PPL, and against transformers max |Δlogit| and argmax agreement, window by window (one window's
    logits in memory at a time: 4096 × 49k float32 logits would be 800 MB per engine)."""
    import torch

    from prunelab.stages.io.gguf_export import _open

    engines = {k: _open(p, len(windows[0]), threads) for k, p in files.items()}
    stats = {k: {"nll": 0.0, "max_abs_diff": 0.0, "agree": 0, "sum_abs_diff": 0.0} for k in ["transformers", *engines]}
    positions, max_logit = 0, 0.0
    for win in windows:
        with torch.inference_mode():
            ref = model(torch.tensor([win])).logits[0].float().numpy()
        nll, ref_arg = _nll_argmax(ref, win)
        stats["transformers"]["nll"] += nll
        max_logit = max(max_logit, float(np.abs(ref).max()))
        for k, llm in engines.items():
            llm.reset()
            llm.eval(win)
            got = np.array(llm.scores[: len(win)], dtype=np.float32)[:, : ref.shape[-1]]
            nll, arg = _nll_argmax(got, win)
            diff = np.abs(got - ref)
            s = stats[k]
            s["nll"] += nll
            s["max_abs_diff"] = max(s["max_abs_diff"], float(diff.max()))
            s["sum_abs_diff"] += float(diff.mean(-1).sum())
            s["agree"] += int((arg == ref_arg).sum())
        positions += len(win)
    predicted = sum(len(w) - 1 for w in windows)
    out: dict[str, Any] = {"max_abs_logit": max_logit, "positions": positions, "predicted_tokens": predicted}
    for k, s in stats.items():
        row: dict[str, Any] = {"ppl": math.exp(s["nll"] / predicted)}
        if k != "transformers":
            row.update(max_abs_diff=s["max_abs_diff"], mean_abs_diff=s["sum_abs_diff"] / positions,
                       argmax_agreement=s["agree"] / positions)
        out[k] = row
    return out


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored (vLLM's ignore_eos); no KV cache, so any pruned structure runs."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def vllm_check(model: Any, tok: Any, run_dir: Path | None, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy continuations in vLLM CPU (launch/vllm_check.py, vLLM's venv) against transformers'."""
    from prunelab.stages.core.files import atomic_dir
    from prunelab.stages.io.export_vllm import vllm_refusal, write_vllm_export

    folder = run_dir / "model-vllm" if run_dir is not None else None
    if folder is None or not (folder / "config.json").is_file():
        refusal = vllm_refusal(model)
        if refusal:
            return {"refused": refusal}
        folder = work / "model-vllm"
        if not (folder / "config.json").is_file():
            with atomic_dir(folder) as tmp:
                write_vllm_export(model, tok, tmp)
    raw = work / "vllm.json"
    cmd = [args.vllm_python, str(ROOT / "launch" / "vllm_check.py"), str(folder), "--prompts", "8",
           "--max-tokens", str(args.max_tokens), "--out", str(raw)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(raw.read_text())
    rows = [{"prompt": c["prompt"], "equal": c["token_ids"] == (ref := greedy(model, c["prompt_token_ids"], args.max_tokens)),
             "first_difference": next((i for i, (a, b) in enumerate(zip(c["token_ids"], ref)) if a != b), None),
             "vllm_text": c["text"]} for c in res["continuations"]]
    return {"folder": str(folder), "vllm_version": res["vllm_version"], "load_s": res["load_s"],
            "trust_remote_code": res["trust_remote_code"], "max_tokens": args.max_tokens,
            "greedy_equal": f"{sum(r['equal'] for r in rows)}/{len(rows)}", "prompts": rows}


def bars(res: dict[str, Any]) -> dict[str, bool]:
    """Issue 25's bars on a result."""
    hf, f32, q = res["transformers"]["ppl"], res["llama.cpp f32"], res[f"llama.cpp {res['quant']}"]
    return {"f32 max|Δ| <= 1e-2": f32["max_abs_diff"] <= BARS["f32_max_abs_diff"],
            "f32 argmax >= 99%": f32["argmax_agreement"] >= BARS["f32_argmax_agreement"],
            "f32 PPL within 0.1%": abs(f32["ppl"] / hf - 1) <= BARS["ppl_rel_diff"],
            f"{res['quant']} PPL within 1% of f32": abs(q["ppl"] / f32["ppl"] - 1) <= BARS["quant_ppl_rel_diff"]}


def table(res: dict[str, Any]) -> str:
    hf = res["transformers"]["ppl"]
    lines = [f"{res['path']}  arch {res['gguf']['architecture']}  {res['protocol']}",
             f"{'engine':<22}{'max|Δlogit|':>12}{'mean|Δ|':>10}{'argmax':>9}{'PPL':>11}{'vs HF':>10}{'MB':>8}",
             f"{'transformers f32':<22}{'':>12}{'':>10}{'':>9}{hf:>11.4f}{'':>10}{'':>8}"]
    for k in ("llama.cpp f32", f"llama.cpp {res['quant']}", *res["extra"]):
        r = res[k]
        lines.append(f"{k:<22}{r['max_abs_diff']:>12.2e}{r['mean_abs_diff']:>10.1e}{r['argmax_agreement']:>9.2%}"
                     f"{r['ppl']:>11.4f}{r['ppl'] / hf - 1:>+10.3%}{r['bytes'] / 2**20:>8.1f}")
    for k in [f"llama.cpp {res['quant']}", *res["extra"]]:
        lines.append(f"{k} vs f32 PPL: {res[k]['ppl'] / res['llama.cpp f32']['ppl'] - 1:+.3%} "
                     f"(token_embd/output {res[k]['embedding_dtype']})")
    if "vllm" in res:
        lines.append(f"vLLM: {res['vllm'].get('greedy_equal', res['vllm'].get('refused'))}")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in res["bars"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    hf_dir, run_dir = resolve(args.path)
    from prunelab.stages.io.gguf_export import gguf_refusal, llama_cpp_missing, write_gguf

    missing = llama_cpp_missing()
    if missing:
        raise SystemExit(missing)
    import torch
    from transformers import AutoTokenizer

    from prunelab.stages.io.config import TextSource
    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.io.text import read_text, tokenize_text

    t0 = time.perf_counter()
    model = load_pruned(hf_dir, dtype=torch.float32)
    refusal = gguf_refusal(model)
    if refusal:
        raise SystemExit(refusal)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenize_text(tok, read_text(TextSource(path=str(args.text)))).tolist()[: args.tokens]
    n = len(ids) // args.window
    if n == 0:
        raise SystemExit(f"--text {args.text}: {len(ids)} tokens, fewer than one window of {args.window}")
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(n)]
    work = args.work or (run_dir or hf_dir) / "llamacpp-check"
    work.mkdir(parents=True, exist_ok=True)
    tok_gguf = tokenizer_gguf(run_dir)
    files, infos = {}, {}
    variants = [("f32", "f32", None), (args.quant, args.quant, args.embedding_dtype)]
    if args.also_embedding_dtype:
        variants.append((f"{args.quant} emb {args.also_embedding_dtype}", args.quant, args.also_embedding_dtype))
    for key, dtype, emb in variants:
        path = work / f"model-{key.replace(' ', '-')}.gguf"
        infos[key] = write_gguf(model, path, dtype, tokenizer=None if tok_gguf else tok, tokenizer_gguf=tok_gguf,
                                embedding_dtype=emb)
        files[f"llama.cpp {key}"] = path
    import llama_cpp

    res: dict[str, Any] = {
        "path": str(args.path), "hf_dir": str(hf_dir), "quant": args.quant,
        "params": sum(p.numel() for p in model.parameters()),
        "gguf": {k: v for k, v in infos["f32"].items() if k != "dtype"},
        "tokenizer_from": str(tok_gguf) if tok_gguf else "tokenizer.json",
        "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "protocol": (f"{args.text.name}: first {n * args.window} tokens (tokenized once, evaluate-stage protocol) in "
                     f"{n} non-overlapping windows of {args.window}; transformers float32 vs llama.cpp with f32 KV "
                     f"cache; logits at all {n * args.window} positions, PPL over {n * (args.window - 1)} predicted"),
    }
    res.update(compare(model, files, windows, args.threads))
    for key in infos:
        res[f"llama.cpp {key}"].update(bytes=infos[key]["bytes"], embedding_dtype=infos[key]["embedding_dtype"])
    res["extra"] = [f"llama.cpp {k}" for k in list(infos)[2:]]
    out = args.out or work / "llamacpp-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res["bars"] = bars(res)
    if args.vllm:  # the llama.cpp numbers first: a vLLM failure or a killed engine leaves them on disk
        out.write_text(json.dumps(res, indent=2) + "\n")
        res["vllm"] = vllm_check(model, tok, run_dir, work, args)
    if "greedy_equal" in res.get("vllm", {}):
        res["bars"]["vLLM greedy = transformers on every prompt"] = all(r["equal"] for r in res["vllm"]["prompts"])
    res["passed"] = all(res["bars"].values())
    res["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res), flush=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
