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


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None = None,
           template_kwargs: dict | None = None) -> str:
    # tools are rendered by the template itself (most put them in the system turn), as verl does.
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))


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


def encode_pair(tokenizer, prompt: str, response: str, where: str, response_end: str = "template",
                template_kwargs: dict | None = None) -> Encoded:
    """One prompt/response sample. With a chat template the prompt is a user turn; the
    response ends with the template's turn end ("template") or, as verl's SFTDataset
    builds it, with the response text followed by the tokenizer's eos token ("eos")."""
    if has_chat_template(tokenizer) and response_end == "template":
        return encode_messages(tokenizer, [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": response}], where,
                               template_kwargs=template_kwargs)
    if tokenizer.eos_token_id is None:
        raise VerliteError("the tokenizer has no eos token; set data.chat_template or data.response_end=template")
    if has_chat_template(tokenizer):
        text = render(tokenizer, [{"role": "user", "content": prompt}], True, template_kwargs=template_kwargs)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def encode_messages(tokenizer, messages: list[dict], where: str, tools: list | None = None,
                    template_kwargs: dict | None = None, ignore_mismatch: bool = False,
                    loss_after_turn_end: bool = False) -> Encoded:
    """Loss on every assistant message (tool-call turns included); everything else, tool
    results too, is context. The tokens are the whole conversation's, rendered once.
    `loss_after_turn_end`: the whitespace the template puts after a turn's end marker carries
    loss too, as in verl's MultiTurnSFTDataset."""
    if not has_chat_template(tokenizer):
        raise VerliteError(f"{where}: multi-turn data needs a tokenizer with a chat template; set data.chat_template")

    full = render(tokenizer, messages, False, tools, template_kwargs)

    def text(upto: int, gen: bool) -> str:
        if upto == len(messages) and not gen:
            return full  # the last turn's "through" is the whole conversation: rendered once
        return render(tokenizer, messages[:upto], gen, tools, template_kwargs) if upto else ""

    pieces: list[tuple[str, int]] = []  # (text, carries_loss)
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = text(i, True), text(i + 1, False)
        start, end = len(before), len(through)
        if start < cursor or not full.startswith(before) or not full.startswith(through):
            if ignore_mismatch:
                return encode_turns(tokenizer, messages, tools, template_kwargs)
            raise VerliteError(f"{where}: the chat template does not render conversations as growing prefixes, "
                               "so assistant turns cannot be located; set data.ignore_input_ids_mismatch=true to "
                               "tokenize turn by turn (as verl does), or set data.chat_template to one that does")
        pieces.append((full[cursor:start], 0))
        if not loss_after_turn_end:  # the newline after <|im_end|> is never generated: no loss
            end = start + len(full[start:end].rstrip())
        pieces.append((full[start:end], 1))
        cursor = end
    pieces.append((full[cursor:], 0))
    pieces = [(t, loss) for t, loss in pieces if t]
    # One batched call for the row's pieces: the tokenizer's per-call overhead was a third of
    # the time of tokenizing short samples (bench/token_cache.py).
    encoded = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
    ids: list[int] = []
    mask: list[int] = []
    for piece, (_, loss) in zip(encoded, pieces):
        ids.extend(piece)
        mask.extend([loss] * len(piece))
    return Encoded(ids, mask)


def _template_parts(tokenizer, template_kwargs: dict | None) -> tuple[list[int], list[int]]:
    """The token ids a template puts before any lone message (a default system turn) and
    the ids of its generation prompt, found by rendering empty user turns."""
    def ids(messages, gen):
        return tokenizer(render(tokenizer, messages, gen, None, template_kwargs), add_special_tokens=False)["input_ids"]

    one = ids([{"role": "user", "content": ""}], False)
    two = ids([{"role": "user", "content": ""}] * 2, False)
    turn = len(two) - len(one)
    system = one[: len(one) - turn]
    generation = ids([{"role": "user", "content": ""}], True)[len(one):]
    return system, generation


def encode_turns(tokenizer, messages: list[dict], tools: list | None = None,
                 template_kwargs: dict | None = None) -> Encoded:
    """verl's per-turn tokenization, for templates whose whole-conversation rendering is not
    a concatenation of turns (data.ignore_input_ids_mismatch): each message is rendered on
    its own, the template's default system turn is dropped after the first message, and an
    assistant turn carries loss after its generation prompt."""
    system, generation = _template_parts(tokenizer, template_kwargs)
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        text = render(tokenizer, [message], False, tools if i == 0 else None, template_kwargs)
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if i and message.get("role") != "system" and piece[: len(system)] == system:
            piece = piece[len(system):]
        if message.get("role") == "assistant":
            skip = len(generation) if piece[: len(generation)] == generation else 0
            piece_mask = [0] * skip + [1] * (len(piece) - skip)
        else:
            piece_mask = [0] * len(piece)
        ids.extend(piece)
        mask.extend(piece_mask)
    return Encoded(ids, mask)
