"""The default evaluation: every model on more than one domain, so a number that holds only in the
calibration domain shows itself.

- ``wikitext2``: WikiText-2 *test* (raw), first 60k tokens, 512-token windows — the in-domain text
  (calibration and recovery read WikiText-2 *valid*);
- ``arc_qa_text``: the ARC-Easy test questions each followed by its correct answer, rendered as plain
  text (``prunelab.stages.io.qa``), all of it (~46k SmolLM2 tokens), 512-token windows — science exam prose,
  never used for calibration or recovery;
- ``arc_easy``: ARC-Easy zero-shot through lm-eval in full (2,376 questions; acc and acc_norm with stderr).

Paths point at the project's reference data (``../shared/data``, relative to the project root, as the
recipes use them). A recipe that names its own data (an entry with a ``source`` / ``path``, or ``speed``)
replaces the suite; an entry named after a suite entry without its own data is a *tweak* of that entry
(``stages.eval.perplexity.wikitext2.max_tokens=1024`` on the command line shrinks the suite's WikiText-2
budget and keeps the rest of the suite). ``tasks: {arc_easy: {path: null}}`` names lm-eval's hub task instead
of the suite's local file.
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


_DATA_KEYS = {"perplexity": "source", "tasks": "path"}


def _is_tweak(section: str, name: str, entry: Any) -> bool:
    """An entry that names a suite entry and brings no data of its own: it adjusts the suite's settings."""
    return name in DEFAULT_SUITE[section] and isinstance(entry, dict) and _DATA_KEYS[section] not in entry


def with_default_suite(raw: Any) -> Any:
    """An evaluate stage's raw settings with the default suite filled in.

    Nothing named → the whole suite. Only tweaks of suite entries → the whole suite, the tweaks merged in.
    Any entry with its own data (or ``speed``) → the recipe's entries alone, suite-named tweaks still given
    the suite's data, so ``perplexity: {wikitext2: {max_tokens: 1024}}`` next to a custom set stays valid.
    """
    if not isinstance(raw, dict):
        return raw
    sections = {k: raw.get(k) or {} for k in _DATA_KEYS}
    if not all(isinstance(v, dict) for v in sections.values()):
        return raw  # let the schema report the wrong type
    only_tweaks = not raw.get("speed") and all(
        _is_tweak(sec, name, entry) for sec, entries in sections.items() for name, entry in entries.items())
    out = dict(raw)
    for sec, entries in sections.items():
        base = DEFAULT_SUITE[sec] if only_tweaks else {}
        merged = {name: dict(entry) for name, entry in base.items()}
        for name, entry in entries.items():
            merged[name] = {**DEFAULT_SUITE[sec][name], **entry} if _is_tweak(sec, name, entry) else entry
        if merged:
            out[sec] = merged
    return out
