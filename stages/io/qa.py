"""Question-answer JSONL rendered as plain text: a second text domain for perplexity and calibration.

``{qa_text: ../shared/data/arc/arc_easy_test.jsonl}`` reads every row, keeps its question and its
*correct* answer, and renders ``Question: …\\nAnswer: …`` (lm-eval's ARC prompt followed by the gold
choice), rows joined by a blank line. Science exam text is far from WikiText's encyclopedia prose, so
perplexity on it shows what calibration and recovery on WikiText do outside their own domain.

Two row layouts are understood: Hugging Face ``allenai/ai2_arc`` (``question``, ``choices.text``,
``choices.label``, ``answerKey``) and a plain ``{question, answer}`` pair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Field, Tag, field_validator

from prunelab.stages.core.config import InputFile, StrictModel
from prunelab.stages.io.config import TextSource


class QATextSource(StrictModel):
    """A local QA JSONL file rendered as text (each question followed by its correct answer)."""

    qa_text: InputFile = Field(..., description="local .jsonl of questions (ARC layout or {question, answer})")
    template: str = Field("Question: {question}\nAnswer: {answer}", description="how one row is rendered")
    join: str = Field("\n\n", description="separator between rendered rows")

    @field_validator("qa_text")
    @classmethod
    def _jsonl(cls, v: str) -> str:
        if not v.endswith(".jsonl"):
            raise ValueError(f"qa_text {v!r}: give a .jsonl file with one question per line")
        return v

    @field_validator("template")
    @classmethod
    def _fields(cls, v: str) -> str:
        if "{question}" not in v or "{answer}" not in v:
            raise ValueError("template must contain {question} and {answer}")
        return v

    @property
    def path(self) -> str:
        """The local file (what the preflight checks exist and are readable)."""
        return self.qa_text

    def describe(self) -> str:
        return f"qa_text:{self.qa_text}"


def answer_of(row: dict[str, Any], where: str) -> str:
    """The correct answer's text in either supported layout."""
    if "answer" in row and "choices" not in row:
        return str(row["answer"])
    try:
        choices = row["choices"]
        return str(choices["text"][choices["label"].index(row["answerKey"])])
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: a row is neither ARC layout (question, choices.text/label, answerKey) "
                         f"nor {{question, answer}} ({exc!r})") from None


def render_qa(source: QATextSource) -> str:
    """Every row of the file as ``template`` text, joined by ``source.join``."""
    path = Path(source.qa_text)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return render_rows(rows, source.template, source.join, str(path))


def render_rows(rows: list[dict[str, Any]], template: str, join: str, where: str) -> str:
    """QA rows (a local file's, or a ``datasets`` split's such as ``allenai/ai2_arc``) as ``template`` text: the
    same rendering whichever way the rows came (prunelab.stages.io.named_data)."""
    if not rows:
        raise ValueError(f"{where}: no rows")
    out = []
    for i, row in enumerate(rows):
        at = f"{where}:{i + 1}"
        if "question" not in row:
            raise ValueError(f"{at}: a row has no 'question'")
        out.append(template.format(question=str(row["question"]).strip(), answer=answer_of(row, at).strip()))
    return join.join(out)


def _text_or_qa(value: Any) -> str:
    if isinstance(value, QATextSource) or (isinstance(value, dict) and "qa_text" in value):
        return "qa_text"
    return "text"


# An evaluation or prompt text: a file / `datasets` split, or a QA file rendered as text.
TextOrQASource = Annotated[
    Union[Annotated[TextSource, Tag("text")], Annotated[QATextSource, Tag("qa_text")]],  # noqa: UP007
    Discriminator(_text_or_qa),
]
