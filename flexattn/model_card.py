"""What a loaded model is and what it can answer, in one line for people (the app's header).

A checkpoint says what it was trained on in its `training_info.json`: `"trained_on"` names a synthetic benchmark
(`flexattn.synthetic.BENCHES`), whose question forms come from `flexattn.synthetic` and are never restated here.
Without that file or field, a checkpoint is taken for what its layout says: a LLaVA-1.5 model for open questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .synthetic import BENCHES, FAMILY_KINDS, QUESTION_TEMPLATES

TRAINING_INFO = "training_info.json"


@dataclass(frozen=True)
class ModelCard:
    summary: str  # one sentence
    question_forms: tuple[str, ...] = ()  # the forms it was trained on; empty: open questions
    trained_on: str | None = None  # a synthetic benchmark name, or None


def question_forms(bench: str) -> tuple[str, ...]:
    """The question templates of a synthetic benchmark's families, placeholders written ‹colour›, ‹letter› ..."""
    kinds = [kind for family in BENCHES[bench] for kind in FAMILY_KINDS[family]]
    return tuple(re.sub(r"\{(\w+)\}", r"‹\1›", QUESTION_TEMPLATES[kind]) for kind in kinds)


def model_card(training_info: dict | None) -> ModelCard:
    trained_on = (training_info or {}).get("trained_on")
    if trained_on in BENCHES:
        return ModelCard("A small model trained only on synthetic images of coloured shapes carrying tiny letters: "
                         "it knows the few words of these questions, nothing else.",
                         question_forms(trained_on), trained_on)
    return ModelCard("A LLaVA-1.5 model with FlexAttention: open questions about any image.")


def read_training_info(directory: str | Path) -> dict:
    """A local checkpoint's training_info.json ({} when it has none or it is unreadable: it only describes)."""
    path = Path(directory) / TRAINING_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
