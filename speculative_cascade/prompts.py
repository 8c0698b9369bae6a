"""Prompts: the shipped instruction list, Spec-Bench JSONL files, and the chat template.

Every command encodes prompts here, so the CLI, the API, the bench, tune and distill give a
prompt the same token ids.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import CascadeError

SHIPPED_PROMPTS = Path(__file__).parent / "data" / "distill_prompts.txt"
SPEC_BENCH = Path("..") / "shared" / "data" / "spec_bench" / "question.jsonl"


def default_prompt_file() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = (base / SPEC_BENCH).resolve()
        if p.is_file():
            return p
    raise CascadeError("no default prompt file (../shared/data/spec_bench/question.jsonl); pass --prompts")


def load_prompts(path: Path | None, per_category: int) -> list[dict]:
    """Spec-Bench JSONL -> [{'id', 'category', 'prompt'}], the first turn of each line."""
    path = Path(path) if path is not None else default_prompt_file()
    if not path.is_file():
        raise CascadeError(f"prompt file not found: {path}")
    if per_category < 0:
        raise CascadeError("--per-category must be >= 0")
    rows, seen = [], defaultdict(int)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                turns = obj["turns"]
                prompt = turns[0] if isinstance(turns, list) else turns
                if not isinstance(prompt, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise CascadeError(f"{path}:{n}: not a Spec-Bench line (needs 'turns': [text, ...])") from None
            cat = obj.get("category", "all")
            if per_category and seen[cat] >= per_category:
                continue
            seen[cat] += 1
            rows.append({"id": obj.get("question_id", n), "category": cat, "prompt": prompt})
    if not rows:
        raise CascadeError(f"no prompts in {path}")
    return rows


def read_prompts(path: Path | None) -> list[str]:
    """Prompts from a text file (one per line) or a Spec-Bench JSONL file (first turn of each line)."""
    path = Path(path) if path else SHIPPED_PROMPTS
    if not path.is_file():
        raise CascadeError(f"prompt file not found: {path}")
    if path.suffix == ".jsonl":
        return [r["prompt"] for r in load_prompts(path, 0)]
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CascadeError(f"no prompts in {path}")
    return prompts


def held_out(path, rows) -> list[str]:
    """One prompt per category from the same file that the benchmark does not run."""
    used = {r["id"] for r in rows}
    seen, out = set(), []
    for r in load_prompts(path, 0):
        if r["id"] not in used and r["category"] not in seen:
            seen.add(r["category"])
            out.append(r["prompt"])
    return out




def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text``; with ``chat``, wrapped in the tokenizer's chat template as one user turn."""
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation (``{"role", "content"}`` dicts) in the tokenizer's chat template,
    ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise CascadeError("this tokenizer has no chat template; use chat=False")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's own checks raise anything (ValueError, jinja2 errors)
        raise CascadeError(f"the chat template rejected the messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)
