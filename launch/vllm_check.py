"""Run a prunelab vLLM export in vLLM CPU: greedy continuations of fixed prompts, load time, decode speed.

Runs with the vLLM venv's python (vLLM is not a prunelab dependency: it pins its own torch/transformers), e.g.::

    /work/vllm-venv/bin/python launch/vllm_check.py runs/x/model-vllm --prompts 8 --max-tokens 32 --out r.json
    /work/vllm-venv/bin/python launch/vllm_check.py runs/x --out r.json      # a run folder: its model-vllm/
    # decode speed against the dense model, interleaved in one process, threads fixed:
    ... launch/vllm_check.py runs/x/model-vllm --baseline dense-vllm/ --speed-rounds 5 --speed-tokens 128 --out r.json

The engine runs float32 (the export's dtype in the tests), ``enforce_eager`` (no torch.compile: minutes of
compilation on two cores would dominate; the speed ratio compares like with like), one OpenMP thread bound to the
CPUs of ``--cpus``. ``trust_remote_code`` is switched on only for a folder that ships its config code (the DeciLM
export's ``configuration_decilm.py``, see ``stages/io/export_vllm.py``).

Decode tokens/s at batch 1 = (T - 1) / (t(T tokens) - t(1 token)) on the same prompt, so prefill is excluded;
with ``--baseline`` the rounds alternate model / baseline and the JSON gives each round's numbers and the medians.
The vLLM engine core is a spawned process, so everything runs under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

PROMPTS: list[str] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The main reason the sky looks blue is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first humans landed on",
    "A good way to learn a new language is",
]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path, help="a folder written by stages.io.export_vllm.write_vllm_export, or a "
                   "run folder whose export wrote one (formats: [vllm] → <run>/model-vllm)")
    p.add_argument("--prompts", type=int, default=8, help=f"how many of the {len(PROMPTS)} fixed prompts (1..8)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (EOS ignored)")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--baseline", type=Path, default=None, help="a second model folder (the dense model) timed "
                   "interleaved with the first")
    p.add_argument("--speed-rounds", type=int, default=0, help="decode-speed rounds per model (0: no timing)")
    p.add_argument("--speed-tokens", type=int, default=128, help="tokens generated per timed decode")
    p.add_argument("--cpus", default="0", help="VLLM_CPU_OMP_THREADS_BIND: the CPU ids the engine's threads use")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts {args.prompts}: choose 1..{len(PROMPTS)}")
    args.model_dir, args.baseline = (None if d is None else vllm_folder(d) for d in (args.model_dir, args.baseline))
    for d in [args.model_dir] + ([args.baseline] if args.baseline else []):
        if not (d / "config.json").is_file():
            p.error(f"{d}: no config.json — pass a folder written by the vLLM export (formats: [vllm])")
    if args.max_tokens < 1 or args.speed_tokens < 2 or args.speed_rounds < 0:
        p.error("--max-tokens >= 1, --speed-tokens >= 2 and --speed-rounds >= 0")
    return args


def vllm_folder(path: Path) -> Path:
    """A run folder → its ``model-vllm/``; any other folder as given."""
    run_export = path / "model-vllm"
    return run_export if not (path / "config.json").is_file() and (run_export / "config.json").is_file() else path


def _needs_remote_code(model_dir: Path) -> bool:
    """The DeciLM export carries its config class (auto_map); vanilla checkpoints do not."""
    return "auto_map" in json.loads((model_dir / "config.json").read_text())


def _check_head_size(model_dir: Path) -> None:
    """vLLM's CPU attention has kernels for some head sizes only (cpu_attn.py); say so before the engine starts,
    instead of its worker dying mid-generate with 'Unsupported CPU attention configuration'."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise SystemExit(f"{model_dir}: head_dim {head_dim} — vLLM CPU attention runs head sizes {sizes} only "
                         "(a GPU backend may run it)")


def _load(model_dir: Path, args: argparse.Namespace) -> tuple[Any, float]:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
              trust_remote_code=_needs_remote_code(model_dir), seed=0, max_num_seqs=8)
    return llm, time.perf_counter() - t0


def _greedy(llm: Any, prompts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [{"prompt": o.prompt, "prompt_token_ids": list(o.prompt_token_ids),
             "token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outs]


def _timed(llm: Any, tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([PROMPTS[0]], params, use_tqdm=False)
    return time.perf_counter() - t0


def _decode_tps(llm: Any, tokens: int) -> float:
    """Batch-1 decode tokens/s with prefill taken out: (T - 1) / (t(T) - t(1))."""
    return (tokens - 1) / (_timed(llm, tokens) - _timed(llm, 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.cpus)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a 512-token cache of a small model needs far less
    import vllm

    result: dict[str, Any] = {"vllm_version": vllm.__version__, "model_dir": str(args.model_dir),
                              "dtype": args.dtype, "cpus": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                              "enforce_eager": True, "max_tokens": args.max_tokens}
    for d in [args.model_dir] + ([args.baseline] if args.baseline else []):
        _check_head_size(d)
    llm, load_s = _load(args.model_dir, args)
    result["load_s"] = load_s
    result["trust_remote_code"] = _needs_remote_code(args.model_dir)
    result["continuations"] = _greedy(llm, PROMPTS[: args.prompts], args.max_tokens)
    engines = {"model": llm}
    if args.baseline is not None:
        engines["baseline"], result["baseline_load_s"] = _load(args.baseline, args)
        result["baseline_dir"] = str(args.baseline)
    if args.speed_rounds:
        for e in engines.values():  # warm-up: first calls allocate and fill caches
            _decode_tps(e, min(16, args.speed_tokens))
        rounds: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.speed_rounds):  # interleaved: drift in machine load hits both alike
            for k, e in engines.items():
                rounds[k].append(_decode_tps(e, args.speed_tokens))
        result["decode_tokens_per_s"] = {k: {"rounds": v, "median": statistics.median(v)} for k, v in rounds.items()}
        if "baseline" in rounds:
            ratios = [m / b for m, b in zip(rounds["model"], rounds["baseline"])]
            result["decode_speedup"] = {"rounds": ratios, "median": statistics.median(ratios)}
        result["speed_tokens"] = args.speed_tokens
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
