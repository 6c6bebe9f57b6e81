"""Perplexity of a pruned model + a saved LoRA adapter of a run whose recover stage was stopped after the
pruned model's training (the dense control still running). Same protocol as the recipe's eval stages.

    python docs/results/eval_adapter.py runs/<run>  # prints JSON
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.recipe import ModelConfig, TextSource
from stages.data import read_text, tokenize_text
from stages.load import load_model
from stages.lora_train import merge_adapter
from stages.perplexity import windowed_perplexity
from stages.surgery import apply_plan

run = Path(sys.argv[1])
model, tok = load_model(ModelConfig(source="smollm2-135m", dtype="float32"))
plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
apply_plan(model, plan)
ids = tokenize_text(tok, read_text(TextSource(path="../shared/data/wikitext2/test.txt")))
pruned = windowed_perplexity(model, ids, 512, 16384, progress=False)["ppl"]
merged = merge_adapter(model, next(run.glob("*-recover")) / "adapter")
rec = windowed_perplexity(merged, ids, 512, 16384, progress=False)
print(json.dumps({"pruned": pruned, "recovered": rec["ppl"], "tokens": rec["tokens"], "seq_len": 512,
                  "loss": json.loads((next(run.glob("*-recover")) / "loss.json").read_text()).get("loss", [None])[-1]}))
