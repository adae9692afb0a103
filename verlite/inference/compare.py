"""Base vs fine-tuned on the same file: the question a user asks first ("did it get better?").

Each model is evaluated with `evaluate` (same prompts, same greedy decoding, same answer
check) and the two results are printed as one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from verlite.inference.evaluate import EvalResult, evaluate
from verlite.inference.loading import load_model_and_tokenizer


@dataclass
class Compared:
    name: str
    result: EvalResult


def evaluate_models(models: list[tuple[str, str, Optional[str]]], data: str, out_dir: Path, device=None,
                    **eval_kwargs) -> list[Compared]:
    """Evaluate each (label, checkpoint, base_model) on `data`; predictions go to
    out_dir/eval_<stem>_<label>.jsonl. One model is in memory at a time."""
    rows = []
    for label, checkpoint, base_model in models:
        model, tokenizer = load_model_and_tokenizer(checkpoint, model_name=base_model, device=device)
        output = Path(out_dir) / f"eval_{Path(data).stem}_{label}.jsonl"
        rows.append(Compared(label, evaluate(model, tokenizer, data, output, **eval_kwargs)))
        del model
    return rows


def format_table(rows: list[Compared], checkpoints: dict[str, str]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'model':<{width}}  accuracy  correct/total  checkpoint"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.result.accuracy:8.4f}  {f'{r.result.correct}/{r.result.total}':>13}  "
                     f"{checkpoints.get(r.name, '')}")
    if len(rows) == 2:
        gain = rows[1].result.accuracy - rows[0].result.accuracy
        lines.append(f"{'gain':<{width}}  {gain:+8.4f}")
    return "\n".join(lines)
