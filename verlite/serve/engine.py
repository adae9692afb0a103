"""Continuous batching: a scheduler thread that admits waiting requests into free slots
before each decode step, decodes one token for every live sequence, and retires finished
ones at once so the next request can take the slot.

The HTTP side never touches the model: it submits a `Request` with a callback and gets
`Event`s back (from this thread, so the callback must be thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from verlite.serve.runner import BLOCK
from verlite.serve.sampling import SamplingParams, TextStream, sample

log = logging.getLogger("verlite.serve")

PREFILL_TOKENS = 8192  # prompt tokens (rows x padded width) per prefill batch


class QueueFull(Exception):
    """More requests wait than the queue takes (the API answers 429)."""


class TooLarge(Exception):
    """The request needs more KV cache blocks than the server has in all (the API answers 400)."""


class EngineStopped(Exception):
    """The server is shutting down (the API answers 503)."""


@dataclass
class Event:
    index: int  # which of the request's n choices
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "error"
    completion_tokens: int = 0
    error: Optional[str] = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int  # 0 = base, i = i-th LoRA
    emit: Callable[[Event], None]
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class Sequence:
    request: Request
    index: int
    slot: int
    text: TextStream
    generator: Optional[torch.Generator]
    length: int  # tokens in this slot's cache
    blocks: list[int] = field(default_factory=list)
    last: int = 0  # the sampled token not yet in the cache
    generated: int = 0


class Engine:
    def __init__(self, runner, tokenizer, stop_ids: list[int], max_queue: int = 256):
        self.runner, self.tokenizer = runner, tokenizer
        self.stop_ids = set(stop_ids)
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.aborted: set[int] = set()
        self.live: dict[int, Sequence] = {}  # slot -> sequence
        self.free = list(range(runner.num_slots))
        self.free_blocks = list(range(1, runner.num_blocks))  # block 0 is the runner's scratch
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: Optional[threading.Thread] = None

    # --- called from the HTTP side ---------------------------------------------------------

    def start(self) -> None:
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="verlite-engine", daemon=True)
                self.thread.start()

    def blocks_needed(self, request: Request) -> int:
        """Cache blocks for every choice's prompt and max_tokens, taken at admission."""
        per_choice = -(-(len(request.prompt_ids) + request.params.max_tokens) // BLOCK)
        return request.params.n * per_choice

    def submit(self, request: Request) -> None:
        self.start()
        need = self.blocks_needed(request)
        if need > self.runner.num_blocks - 1:
            raise TooLarge(f"prompt + max_tokens x n need {need * BLOCK} tokens of KV cache; the server has "
                           f"{(self.runner.num_blocks - 1) * BLOCK} (--kv_cache_tokens)")
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max_queue {self.max_queue})")
            self.waiting.append(request)
            self.cond.notify()

    def abort(self, request_id: int) -> None:
        """The client went away: free its slots at the next step."""
        with self.cond:
            self.aborted.add(request_id)
            self.cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def load(self) -> dict:
        with self.cond:
            return {"running": len({s.request.id for s in self.live.values()}), "waiting": len(self.waiting),
                    "free_kv_tokens": len(self.free_blocks) * BLOCK}

    # --- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.live or self.stopping):
                    self.cond.wait()
                if self.stopping and not self.live and not self.waiting:
                    return
                self._drop_aborted()
                admitted, free, blocks = [], len(self.free), len(self.free_blocks)
                while self.waiting and free >= self.waiting[0].params.n and \
                        blocks >= self.blocks_needed(self.waiting[0]):
                    free -= self.waiting[0].params.n
                    blocks -= self.blocks_needed(self.waiting[0])
                    admitted.append(self.waiting.popleft())
            try:
                if admitted:
                    self._prefill(admitted)
                if self.live:
                    self._decode()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("engine step failed")
                self._fail_all(admitted, f"{type(e).__name__}: {e}")

    def _drop_aborted(self) -> None:
        if not self.aborted:
            return
        self.waiting = deque(r for r in self.waiting if r.id not in self.aborted)
        for slot, seq in list(self.live.items()):
            if seq.request.id in self.aborted:
                self._retire(seq)
        self.aborted.clear()

    def _prefill(self, requests: list[Request]) -> None:
        seqs = []
        for request in requests:
            for index in range(request.params.n):
                generator = None
                if request.params.seed is not None:
                    generator = torch.Generator(device=self.runner.device)
                    generator.manual_seed(request.params.seed + index)
                seq = Sequence(request, index, self.free.pop(0), TextStream(self.tokenizer, request.params.stop),
                               generator, length=len(request.prompt_ids))
                with self.cond:
                    count = self.blocks_needed(request) // request.params.n
                    seq.blocks = [self.free_blocks.pop() for _ in range(count)]
                self.runner.assign(seq.slot, seq.blocks)
                self.live[seq.slot] = seq
                seqs.append(seq)
        for group in _prefill_groups(seqs):
            logits = self.runner.prefill([s.slot for s in group], [s.request.prompt_ids for s in group],
                                         [s.request.adapter for s in group])
            self._advance(group, logits)

    def _decode(self) -> None:
        slots = self.runner.num_slots
        tokens, positions, adapters = [0] * slots, [0] * slots, [0] * slots
        seqs = list(self.live.values())
        for seq in seqs:
            tokens[seq.slot], positions[seq.slot], adapters[seq.slot] = seq.last, seq.length, seq.request.adapter
        logits = self.runner.decode(tokens, positions, adapters)
        for seq in seqs:
            seq.length += 1
        rows = torch.tensor([s.slot for s in seqs], device=logits.device)
        self._advance(seqs, logits[rows])

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each sequence's next token, send its text, retire it when done."""
        picks = sample(logits, [s.request.params.temperature for s in seqs], [s.request.params.top_p for s in seqs],
                       [s.generator for s in seqs])
        for seq, token in zip(seqs, picks):
            params = seq.request.params
            seq.generated += 1
            if token in self.stop_ids and not params.ignore_eos:
                self._finish(seq, seq.text.flush(), "stop")
                continue
            text, stopped = seq.text.add(token)
            if stopped:
                self._finish(seq, text, "stop")
            elif seq.generated >= params.max_tokens or seq.length >= self.runner.max_model_len:
                self._finish(seq, text + seq.text.flush(), "length")
            else:
                seq.last = token
                if text:
                    self._send(seq, Event(seq.index, text, completion_tokens=seq.generated))

    def _finish(self, seq: Sequence, text: str, reason: str) -> None:
        self._retire(seq)
        self._send(seq, Event(seq.index, text, reason, seq.generated))

    def _retire(self, seq: Sequence) -> None:
        with self.cond:
            if self.live.get(seq.slot) is seq:
                del self.live[seq.slot]
                self.free.append(seq.slot)
                # Idle slots still write (to position 0): point the row at scratch before the
                # blocks go to another sequence.
                self.runner.assign(seq.slot, [])
                self.free_blocks.extend(seq.blocks)
                seq.blocks = []

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.request.emit(event)
        except Exception:  # a vanished client must not stop the engine
            log.debug("dropping an event for request %d", seq.request.id, exc_info=True)

    def _fail_all(self, admitted: list[Request], message: str) -> None:
        """Every live sequence and every choice of the just-admitted requests ends with an error."""
        told = set()
        for seq in list(self.live.values()):
            self._retire(seq)
            self._send(seq, Event(seq.index, finish_reason="error", error=message))
            told.add((seq.request.id, seq.index))
        for request in admitted:
            for index in range(request.params.n):
                if (request.id, index) not in told:
                    try:
                        request.emit(Event(index, finish_reason="error", error=message))
                    except Exception:
                        pass


def _prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Batches of new sequences whose padded prompt tokens stay within PREFILL_TOKENS."""
    groups, current, width = [], [], 0
    for seq in sorted(seqs, key=lambda s: len(s.request.prompt_ids)):
        longest = max(width, len(seq.request.prompt_ids))
        if current and longest * (len(current) + 1) > PREFILL_TOKENS:
            groups.append(current)
            current, longest = [], len(seq.request.prompt_ids)
        current.append(seq)
        width = longest
    return groups + ([current] if current else [])
