"""llama.cpp speed of pruned GGUFs against the dense model: decode and prompt tokens/s, interleaved, one process.

Runs in the project venv (``pip install 'prunelab[llama]'``)::

    OMP_NUM_THREADS=1 python launch/llamacpp_speed.py flap=runs/smollm2-optimal-comp-mix-20 depth=runs/x/model.gguf \\
        --dense smollm2-135m --work /tmp/llamacpp-speed --threads 2 --rounds 5 --dtypes f32 q8_0 \\
        --out docs/results/llamacpp-speed/speed.json

Each ``LABEL=PATH`` is a ``.gguf`` or a folder holding one ``model.gguf`` (a run directory with ``export: {formats:
[gguf]}``, written in f32). ``--dense`` is a ``.gguf`` or a model source (``smollm2-135m``) written to ``--work`` by
the same exporter (``stages.io.gguf_export.write_gguf``, f32), so dense and pruned differ only in their shapes. q8_0
files are made from the f32 ones by llama.cpp's own quantizer (``llama_model_quantize``: rows that are not whole
32-blocks fall back to f16, as in ``llama-quantize``).

Protocol. Every model of a dtype is loaded once (``llama_cpp.Llama``, ``n_threads`` = ``n_threads_batch`` fixed,
``n_batch`` fixed, f16 KV cache: llama.cpp's default). Per round and per pruned model the dense model and the pruned
one are timed back to back, in alternating order (A-B, then B-A), so drift in machine load hits both: *decode* =
``--decode-tokens`` greedy single-token steps after a 16-token prompt (batch 1, the prompt untimed), tokens/s = steps /
seconds; *prompt* = one ``eval`` of a fixed ``--prompt-tokens`` window from a cleared cache (one batch), tokens/s =
tokens / seconds. The speedup is the median over rounds of the per-round ratio pruned / dense (one warm-up round
first, not counted).

Ideals, from the GGUF tensors: *params (all)* = dense / pruned parameter count (norms and biases included, a tied
embedding counted once); *params (no embedding)* leaves out ``token_embd`` and ``output`` (49,152 × 576 = 28.3M of
SmolLM2's 134.5M, not pruned), the ideal for prompt processing, where llama.cpp computes the output head for the last
token only; *bytes* = the bytes a decode step reads: every tensor but ``token_embd``, plus the output matrix (the tied
``token_embd`` read whole by the head) — the ideal for memory-bound batch-1 decoding, which also sees the dtype mix of
q8_0 (f16 fallbacks).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

PROMPT_TEXT = ("The history of the region begins with small farming villages along the river, whose people traded "
               "grain, salt and pottery with the hill towns to the north. ")
EMBEDDING = ("token_embd.weight", "output.weight")


def find_gguf(path: Path) -> Path:
    """``path`` if it is a .gguf, else the one ``model.gguf`` under the folder (a run directory's export)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.rglob("model.gguf"))
        if len(found) == 1:
            return found[0]
        raise SystemExit(f"{path}: {len(found)} model.gguf files under it; pass the .gguf itself"
                         if found else f"{path}: no model.gguf under it — run the recipe with export formats [gguf]")
    raise SystemExit(f"{path}: neither a .gguf file nor a folder")


def tensor_stats(path: Path) -> dict[str, Any]:
    """Parameter counts and bytes read per decode step, from the GGUF's tensor table (module doc)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: (int(t.n_elements), int(t.n_bytes), t.tensor_type.name) for t in r.tensors}
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    blocks = int(r.fields[f"{arch}.block_count"].parts[-1][0])
    all_params = sum(n for n, _, _ in sizes.values())
    embedding = sum(sizes[k][0] for k in EMBEDDING if k in sizes)
    head = sizes.get("output.weight", sizes["token_embd.weight"])
    decode_bytes = sum(b for k, (_, b, _) in sizes.items() if k != "token_embd.weight") + (
        head[1] if "output.weight" not in sizes else 0)
    types: dict[str, int] = {}
    for _, b, t in sizes.values():
        types[t] = types.get(t, 0) + b
    return {"path": str(path), "architecture": arch, "blocks": blocks, "params_all": all_params,
            "params_no_embedding": all_params - embedding, "decode_bytes": decode_bytes,
            "file_bytes": path.stat().st_size, "bytes_by_type": types}


def quantize(src: Path, dst: Path, threads: int) -> Path:
    """q8_0 copy of an f32 GGUF by llama.cpp's quantizer (kept: a later run reuses it)."""
    import llama_cpp

    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {src}")
    tmp.replace(dst)
    return dst


def dense_gguf(spec: str, work: Path) -> Path:
    """The dense GGUF: ``spec`` itself, or the model source ``spec`` written in f32 by our exporter."""
    if spec.endswith(".gguf") or Path(spec).is_dir():
        return find_gguf(Path(spec))
    out = work / f"dense-{spec.replace('/', '_')}-f32.gguf"
    if not out.is_file():
        import torch

        from prunelab.stages.io.config import ModelConfig
        from prunelab.stages.io.gguf_export import source_gguf, write_gguf
        from prunelab.stages.io.models import load_model

        model, tok = load_model(ModelConfig(source=spec, dtype="float32"))
        tok_gguf = source_gguf(spec, None)
        with torch.inference_mode():
            write_gguf(model, out, "f32", tokenizer=None if tok_gguf else tok, tokenizer_gguf=tok_gguf, name="dense")
        del model
    return out


def open_llm(path: Path, args: argparse.Namespace) -> Any:
    from llama_cpp import Llama

    n_ctx = max(args.prompt_tokens, 16 + args.decode_tokens) + 8
    return Llama(str(path), n_ctx=n_ctx, n_batch=args.batch, n_ubatch=args.batch, n_threads=args.threads,
                 n_threads_batch=args.threads, logits_all=False, verbose=False)


def decode_tps(llm: Any, prompt: list[int], steps: int) -> float:
    """Greedy batch-1 decode: ``steps`` single-token evals after ``prompt`` (untimed); tokens/s."""
    import numpy as np

    vocab = llm.n_vocab()

    def last() -> int:  # logits_all=False: llama.cpp keeps the last position's logits only (not in llm.scores)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))  # noqa: SLF001

    llm.reset()
    llm.eval(prompt)
    nxt = last()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([nxt])
        nxt = last()
    return steps / (time.perf_counter() - t0)


def prompt_tps(llm: Any, ids: list[int]) -> float:
    """One eval of ``ids`` from an empty cache (a single batch when n_batch >= len(ids)); tokens/s."""
    llm.reset()  # n_tokens = 0: eval() first drops every cached position (kv_cache_seq_rm from 0)
    t0 = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t0)


def measure(dense: Any, pruned: dict[str, Any], ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Per round, per pruned model: dense and pruned back to back (order alternating); per-round ratios."""
    out: dict[str, Any] = {k: {"decode": [], "prompt": [], "dense_decode": [], "dense_prompt": []} for k in pruned}
    short = ids[:16]
    for r in range(args.rounds + 1):  # round 0: warm-up, not kept
        for label, llm in pruned.items():
            pair = [("dense", dense), (label, llm)]
            res = {}
            for who, m in (pair if r % 2 else pair[::-1]):
                res[who] = (decode_tps(m, short, args.decode_tokens), prompt_tps(m, ids))
            if r:
                rec = out[label]
                rec["decode"].append(res[label][0])
                rec["prompt"].append(res[label][1])
                rec["dense_decode"].append(res["dense"][0])
                rec["dense_prompt"].append(res["dense"][1])
        print(f"  round {r}{' (warm-up)' if not r else ''} done", flush=True)
    for rec in out.values():
        for k in ("decode", "prompt"):
            ratios = [p / d for p, d in zip(rec[k], rec[f"dense_{k}"])]
            rec[f"{k}_ratio_rounds"] = ratios
            rec[f"{k}_speedup"] = statistics.median(ratios)
            rec[f"{k}_tok_s"] = statistics.median(rec[k])
            rec[f"dense_{k}_tok_s"] = statistics.median(rec[f"dense_{k}"])
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: per dtype and model, tok/s, speedups and the three ideals."""
    lines = ["| dtype | model | arch, blocks | params (no emb.) | decode tok/s (dense) | decode speedup | prompt tok/s "
             "(dense) | prompt speedup | ideal: params all / no emb. / bytes | decode ÷ ideal (params / bytes) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, block in result["dtypes"].items():
        d = block["dense"]
        for label, rec in block["models"].items():
            s = rec["stats"]
            ia, ie, ib = (d["params_all"] / s["params_all"], d["params_no_embedding"] / s["params_no_embedding"],
                          d["decode_bytes"] / s["decode_bytes"])
            rec["ideal"] = {"params_all": ia, "params_no_embedding": ie, "bytes": ib}
            m = rec["measured"]
            lines.append(
                f"| {dtype} | {label} | {s['architecture']}, {s['blocks']} | {s['params_all'] / 1e6:.2f}M "
                f"({s['params_no_embedding'] / 1e6:.2f}M) | {m['decode_tok_s']:.1f} ({m['dense_decode_tok_s']:.1f}) | "
                f"{m['decode_speedup']:.3f}× ({min(m['decode_ratio_rounds']):.2f}–{max(m['decode_ratio_rounds']):.2f}) | "
                f"{m['prompt_tok_s']:.0f} ({m['dense_prompt_tok_s']:.0f}) | {m['prompt_speedup']:.3f}× | "
                f"{ia:.3f}× / {ie:.3f}× / {ib:.3f}× | {m['decode_speedup'] / ia:.2f} / {m['decode_speedup'] / ib:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="LABEL=PATH: a .gguf (f32) or a run folder with one model.gguf")
    p.add_argument("--dense", required=True, help="the dense model: a .gguf, or a model source (smollm2-135m) "
                   "written in f32 to --work")
    p.add_argument("--work", type=Path, required=True, help="folder for the dense GGUF and the q8_0 copies")
    p.add_argument("--out", type=Path, required=True, help="result JSON (a .md table is written beside it)")
    p.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch of every model")
    p.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch (>= --prompt-tokens: one batch)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy single-token steps per decode timing")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of the timed prompt")
    p.add_argument("--dtypes", nargs="+", default=["f32"], choices=["f32", "q8_0"])
    args = p.parse_args(argv)
    if args.rounds < 1 or args.decode_tokens < 1 or args.prompt_tokens < 2 or args.threads < 1:
        p.error("--rounds, --decode-tokens, --threads >= 1 and --prompt-tokens >= 2")
    if args.batch < args.prompt_tokens:
        p.error(f"--batch {args.batch} < --prompt-tokens {args.prompt_tokens}: the prompt would run in several batches")
    specs = {}
    for s in args.models:
        label, sep, path = s.partition("=")
        if not sep or not label or label == "dense" or label in specs:
            p.error(f"{s!r}: write LABEL=PATH with a label of its own (not 'dense')")
        specs[label] = find_gguf(Path(path))
    import llama_cpp

    args.work.mkdir(parents=True, exist_ok=True)
    dense_f32 = dense_gguf(args.dense, args.work)
    result: dict[str, Any] = {
        "llama_cpp_python": llama_cpp.__version__, "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "n_batch": args.batch, "rounds": args.rounds, "decode_tokens": args.decode_tokens,
        "prompt_tokens": args.prompt_tokens, "dense": str(dense_f32), "dtypes": {},
        "protocol": (f"llama-cpp-python {llama_cpp.__version__}, n_threads {args.threads}, n_batch {args.batch}, f16 KV "
                     f"cache; per round and model dense and pruned back to back (order alternating), {args.rounds} "
                     f"rounds after 1 warm-up; decode: {args.decode_tokens} greedy single-token steps after a 16-token "
                     f"prompt (batch 1); prompt: one {args.prompt_tokens}-token eval from an empty cache; medians of "
                     "per-round ratios")}
    for dtype in args.dtypes:
        paths = {"dense": dense_f32, **specs}
        if dtype == "q8_0":
            paths = {k: quantize(v, args.work / f"{k}-q8_0.gguf", args.threads) for k, v in paths.items()}
        llms = {k: open_llm(v, args) for k, v in paths.items()}
        text = PROMPT_TEXT * (args.prompt_tokens // 8)
        ids = llms["dense"].tokenize(text.encode(), add_bos=False)[: args.prompt_tokens]
        print(f"{dtype}: {len(specs)} models against dense, {args.rounds} rounds", flush=True)
        measured = measure(llms.pop("dense"), llms, ids, args)
        result["dtypes"][dtype] = {
            "dense": tensor_stats(paths["dense"]),
            "models": {k: {"stats": tensor_stats(paths[k]), "measured": measured[k]} for k in specs}}
        del llms
    md = table(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md + "\n" + result["protocol"] + "\n")
    return result


if __name__ == "__main__":
    main()
