"""LLaVA v1 conversation prompt, tokenised around the image the way LLaVA-1.5 does it."""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE = "<image>"
MAX_QUESTION_CHARS = 2000


class PromptError(ValueError):
    """A question the model cannot take; the message is meant for the user."""


def check_question(question: str) -> str:
    question = (question or "").strip()
    if not question:
        raise PromptError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise PromptError(f"the question is too long ({len(question)} characters; at most {MAX_QUESTION_CHARS})")
    return question


def conversation(question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """v1 template; the image goes with the first user turn. `history` holds earlier (question, answer) pairs."""
    turns = [*history, (question, None)]
    parts = [SYSTEM]
    for i, (q, a) in enumerate(turns):
        q = f"{IMAGE}\n{q}" if i == 0 else q
        parts.append(f" USER: {q} ASSISTANT:" if i == 0 else f"USER: {q} ASSISTANT:")
        if a is not None:
            parts.append(f" {a}</s>")
    return "".join(parts)


def tokenize_around_image(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image placeholder.

    Like LLaVA's `tokenizer_image_token`: each text chunk is tokenised on its own and only the first keeps BOS.
    """
    before, after = prompt.split(IMAGE, 1)
    ids_before = tokenizer(before).input_ids
    ids_after = tokenizer(after).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids_after[:1] == [bos]:
        ids_after = ids_after[1:]
    return ids_before, ids_after
