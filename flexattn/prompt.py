"""LLaVA v1 conversation prompt, tokenised around the image the way LLaVA-1.5 does it."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE = "<image>"
MAX_QUESTION_CHARS = 2000


class PromptError(ValueError):
    """A question the model cannot take; the message is meant for the user."""


def strip_controls(text: str) -> str:
    """`text` without control characters (NUL, ESC, DEL, C1 ...): tabs become spaces, line breaks stay."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return "".join(c for c in text if c == "\n" or unicodedata.category(c) != "Cc")


def check_question(question: str) -> str:
    """The question as the model will see it (control characters removed, ends trimmed), or PromptError."""
    question = strip_controls(question or "").strip()
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


def unknown_words(tokenizer, text: str) -> list[str]:
    """The parts of `text` the tokenizer cannot spell, in order, each once: what it maps to its unknown token, and
    whole words it drops (no piece for their characters, not even a byte: they would vanish from the prompt).

    A word-level tokenizer (the embedded model's) maps every word outside its vocabulary to <unk>; a subword
    tokenizer with byte fallback (LLaMA's) spells anything, so this is normally empty for it. Offsets give the
    original spelling ("CAT", not "cat")."""
    unk = getattr(tokenizer, "unk_token_id", None)
    found: list[tuple[int, str]] = []  # (where, what)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [list(span) for token, span in zip(encoded.input_ids, encoded.offset_mapping) if token == unk]
    except (NotImplementedError, TypeError, ValueError):  # no offsets: the word-by-word check below finds them
        spans = []
    merged: list[list[int]] = []
    for a, b in spans:  # adjacent unknown pieces of one word are one word
        if merged and a <= merged[-1][1]:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    found += [(a, text[a:b].strip()) for a, b in merged]
    start = 0
    for word in text.split():
        start = text.index(word, start)
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if unk in ids and not spans or not tokenizer.decode(ids, skip_special_tokens=True).strip():
            found.append((start, word))
        start += len(word)
    return list(dict.fromkeys(w for _, w in sorted(found, key=lambda item: item[0]) if w))
