"""Exact-match evaluation: generate for every row, compare final answers.

The final answer is what follows GSM8K's `#### ` or the article's `答案是`; numbers are
compared as numbers (commas dropped, 42 == 42.0). A prediction whose whole text equals the
reference also counts, for data with neither convention.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from verlite.data.readers import read_rows, resolve_files
from verlite.errors import VerliteError
from verlite.inference.generate import generate
from verlite.outputs import output_file

log = logging.getLogger("verlite.inference")

_MARKERS = ("####", "答案是")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> Optional[str]:
    """The answer after the last `####` / `答案是`, normalised; None when there is no marker."""
    ends = [text.rfind(m) + len(m) for m in _MARKERS if m in text]
    if not ends:
        return None
    tail = text[max(ends):].strip()
    number = _NUMBER.match(tail)
    if number:
        value = float(number.group().replace(",", ""))
        return str(int(value)) if value.is_integer() else str(value)
    return tail.rstrip("。.!！ ").strip() or None


def is_correct(prediction: str, reference: str) -> bool:
    gold = final_answer(reference)
    if gold is not None and final_answer(prediction) == gold:
        return True
    return prediction.strip() == reference.strip()


@dataclass
class EvalResult:
    correct: int
    total: int
    predictions_path: Path

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)


def evaluate(model, tokenizer, data: str, output: Path, prompt_key: str = "question", response_key: str = "answer",
             limit: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 256) -> EvalResult:
    from tqdm import tqdm

    rows = [row for path in resolve_files(data, "--data") for row in read_rows(path)]
    rows = rows[:limit] if limit else rows
    for row in rows:
        for key, flag in ((prompt_key, "--prompt_key"), (response_key, "--response_key")):
            if not isinstance(row.data.get(key), str):
                raise VerliteError(f"{row.where}: no text under key '{key}'; pass {flag} with the right field name")
    correct = 0
    with output_file(output, "eval --output") as f, tqdm(total=len(rows), unit="sample", desc="eval") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            outs = generate(model, tokenizer, [r.data[prompt_key] for r in batch], max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
            for row, pred in zip(batch, outs):
                ok = is_correct(pred, row.data[response_key])
                correct += ok
                f.write(json.dumps({"where": row.where, "prompt": row.data[prompt_key],
                                    "reference": row.data[response_key], "prediction": pred,
                                    "reference_answer": final_answer(row.data[response_key]),
                                    "predicted_answer": final_answer(pred), "correct": ok}, ensure_ascii=False) + "\n")
            bar.update(len(batch))
    return EvalResult(correct, len(rows), output)
