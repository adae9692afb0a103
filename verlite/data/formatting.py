"""Turn one sample into token ids and a loss mask, exactly as generation will see it.

With a chat template, the conversation is rendered to text once and cut at message
boundaries; each piece is tokenized on its own, so the prompt's tokens are the same ones
`generate` produces for that prompt, and only assistant pieces carry loss (their
end-of-turn token included). Without a template: prompt, response, eos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from verlite.errors import VerliteError


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is predicted with loss (response tokens, eos)


def apply_chat_template_override(tokenizer, template: str | None) -> None:
    """`data.chat_template` is a Jinja string or a path to a file holding one."""
    if not template:
        return
    path = os.path.expanduser(template)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = f.read()
    tokenizer.chat_template = template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """The text a prompt becomes before generation: the same prefix training used."""
    if not has_chat_template(tokenizer):
        if not isinstance(prompt, str):
            raise VerliteError("a multi-turn prompt needs a tokenizer with a chat template (set data.chat_template)")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    text = prompt_text(tokenizer, prompt)
    # Without a template the tokenizer's own specials (e.g. BOS) open the prompt, as in training.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, where: str) -> Encoded:
    if has_chat_template(tokenizer):
        return encode_messages(tokenizer, [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": response}], where)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise VerliteError("the tokenizer has no eos token and no chat template; set data.chat_template")
    response_ids = response_ids + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def encode_messages(tokenizer, messages: list[dict], where: str) -> Encoded:
    """Loss on every assistant message; everything else is context."""
    if not has_chat_template(tokenizer):
        raise VerliteError(f"{where}: multi-turn data needs a tokenizer with a chat template; set data.chat_template")
    full = render(tokenizer, messages, add_generation_prompt=False)
    pieces: list[tuple[str, int]] = []  # (text, carries_loss)
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start, end = len(before), len(through)
        if start < cursor or not full.startswith(before) or not full.startswith(through):
            raise VerliteError(f"{where}: the chat template does not render conversations as growing prefixes, "
                               "so assistant turns cannot be located; set data.chat_template to one that does")
        pieces.append((full[cursor:start], 0))
        end = start + len(full[start:end].rstrip())  # the newline after <|im_end|> is never generated: no loss
        pieces.append((full[start:end], 1))
        cursor = end
    pieces.append((full[cursor:], 0))
    ids: list[int] = []
    mask: list[int] = []
    for text, loss in pieces:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([loss] * len(piece))
    return Encoded(ids, mask)
