"""The default evaluation: every model on more than one domain, so a number that holds only in the
calibration domain shows itself.

- ``wikitext2``: WikiText-2 *test* (raw), first 60k tokens, 512-token windows — the in-domain text
  (calibration and recovery read WikiText-2 *valid*);
- ``arc_qa_text``: the ARC-Easy test questions each followed by its correct answer, rendered as plain
  text (``stages.io.qa``), all of it (~46k SmolLM2 tokens), 512-token windows — science exam prose,
  never used for calibration or recovery;
- ``arc_easy``: ARC-Easy zero-shot through lm-eval in full (2,376 questions; acc and acc_norm with stderr).

Paths point at the project's reference data (``../shared/data``, relative to the project root, as the
recipes use them); a recipe that names its own ``perplexity`` / ``tasks`` / ``speed`` replaces the suite.
"""

from __future__ import annotations

from typing import Any

SHARED = "../shared/data"

DEFAULT_SUITE: dict[str, Any] = {
    "perplexity": {
        "wikitext2": {"source": {"path": f"{SHARED}/wikitext2/test.txt"}, "seq_len": 512, "max_tokens": 60000, "batch_size": 4},
        "arc_qa_text": {"source": {"qa_text": f"{SHARED}/arc/arc_easy_test.jsonl"}, "seq_len": 512, "batch_size": 4},
    },
    "tasks": {"arc_easy": {"path": f"{SHARED}/arc/arc_easy_test.jsonl", "batch_size": 32}},
}


def with_default_suite(raw: Any) -> Any:
    """An evaluate stage's raw settings, the default suite filled in when it names nothing to evaluate."""
    if isinstance(raw, dict) and not any(raw.get(k) for k in ("perplexity", "tasks", "speed")):
        return {**raw, **DEFAULT_SUITE}
    return raw
