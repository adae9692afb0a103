"""Continuous batching: a scheduler thread that admits waiting requests into free slots
before each decode step, decodes one token for every live sequence, and retires finished
ones at once so the next request can take the slot.

The host runs one step behind the GPU: the sampled tokens stay on the device and feed the
next step, so step N+1 is queued before step N's tokens are read back (one copy to the
host per step) and turned into text; a sequence that turns out finished has one wasted
step, which writes only inside its own cache blocks. Nothing in a step waits on the GPU
but that read-back.

The HTTP side never touches the model: it submits a `Request` with a callback and gets
`Event`s back. With `loop` set, the callback runs on that asyncio loop, all of a step's
events in one hand-over; without it, on the engine thread (so it must be thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict, deque
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
    loop: Optional[object] = None  # an asyncio loop: emit runs there (see the module doc)


@dataclass
class Sequence:
    request: Request
    index: int
    slot: int
    text: TextStream
    generator: Optional[torch.Generator]
    length: int  # the position the next queued step writes (the device runs ahead of the host)
    blocks: list[int] = field(default_factory=list)
    generated: int = 0  # tokens the host has seen
    done: bool = False


@dataclass
class Step:
    """A queued prefill or decode step: its sampled tokens on their way to the host."""
    rows: list[tuple[Sequence, int]]  # (sequence, its index in `tokens`)
    tokens: torch.Tensor
    ready: Optional[object]  # a CUDA event, None on CPU


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
        self.outbox: dict[object, list] = defaultdict(list)  # loop -> [(emit, event)] of this step

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
        if len(request.prompt_ids) + request.params.max_tokens > self.runner.max_model_len:
            raise TooLarge(f"the prompt's {len(request.prompt_ids)} tokens + max_tokens {request.params.max_tokens} "
                           f"exceed the context of {self.runner.max_model_len}")
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
        pending: deque[Step] = deque()
        while True:
            with self.cond:
                while not (self.waiting or self.live or self.stopping or pending):
                    self.cond.wait()
                if self.stopping and not self.live and not self.waiting and not pending:
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
                    pending.extend(self._prefill(admitted))
                queued = self._decode() if self.live else None
                if queued is not None:
                    pending.append(queued)
                # The last round's events go out only now: handing them over lets the HTTP thread
                # take the GIL, and the GPU should have its next step by then.
                self._deliver()
                while pending and pending[0] is not queued:  # the GPU runs `queued` meanwhile
                    self._collect(pending.popleft())
                if queued is None:
                    self._deliver()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("engine step failed")
                pending.clear()
                self._fail_all(admitted, f"{type(e).__name__}: {e}")
                self._deliver()

    def _drop_aborted(self) -> None:
        if not self.aborted:
            return
        self.waiting = deque(r for r in self.waiting if r.id not in self.aborted)
        for slot, seq in list(self.live.items()):
            if seq.request.id in self.aborted:
                self._retire(seq)
        self.aborted.clear()

    def _prefill(self, requests: list[Request]) -> list[Step]:
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
        steps = []
        for group in _prefill_groups(seqs):
            slots = [s.slot for s in group]
            logits = self.runner.prefill(slots, [s.request.prompt_ids for s in group],
                                         [s.request.adapter for s in group])
            picks = self._sample(logits, group)
            self.runner.admit(self.runner.upload(slots), picks, [s.length for s in group],
                              [s.request.adapter for s in group])
            steps.append(Step([(s, i) for i, s in enumerate(group)], *self.runner.fetch(picks)))
        return steps

    def _decode(self) -> Step:
        """Queue one decode step for every live sequence (the step feeds itself its tokens)."""
        seqs = list(self.live.values())
        logits = self.runner.step(self.runner.bucket(max(s.length for s in seqs) + 1))
        sampled = [s for s in seqs if s.request.params.temperature > 0]
        if sampled:  # the step left greedy tokens in place; these rows draw theirs
            rows = self.runner.upload([s.slot for s in sampled])
            self.runner.tokens.index_copy_(0, rows, self._sample(logits.index_select(0, rows), sampled))
        for seq in seqs:
            seq.length += 1
        return Step([(s, s.slot) for s in seqs], *self.runner.fetch(self.runner.tokens))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(s.request.params.temperature <= 0 for s in seqs):
            return logits.argmax(dim=-1)
        return sample(logits, [s.request.params.temperature for s in seqs], [s.request.params.top_p for s in seqs],
                      [s.generator for s in seqs])

    def _collect(self, step: Step) -> None:
        """A finished step's tokens: send each sequence's text, retire the ones that are done."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.tokens.tolist()
        for seq, row in step.rows:
            if not seq.done:  # a sequence that finished earlier had one more step queued
                self._advance(seq, tokens[row])

    def _advance(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        seq.generated += 1
        if token in self.stop_ids and not params.ignore_eos:
            self._finish(seq, seq.text.flush(), "stop")
            return
        text, stopped = seq.text.add(token)
        if stopped:
            self._finish(seq, text, "stop")
        elif seq.generated >= params.max_tokens or \
                len(seq.request.prompt_ids) + seq.generated > self.runner.max_model_len:
            self._finish(seq, text + seq.text.flush(), "length")
        elif text:
            self._send(seq, Event(seq.index, text, completion_tokens=seq.generated))

    def _finish(self, seq: Sequence, text: str, reason: str) -> None:
        self._retire(seq)
        self._send(seq, Event(seq.index, text, reason, seq.generated))

    def _retire(self, seq: Sequence) -> None:
        seq.done = True
        with self.cond:
            if self.live.get(seq.slot) is seq:
                del self.live[seq.slot]
                self.free.append(seq.slot)
                # Idle slots still write (to position 0): point the row at scratch before the
                # blocks go to another sequence.
                self.runner.release(seq.slot)
                self.free_blocks.extend(seq.blocks)
                seq.blocks = []

    def _send(self, seq: Sequence, event: Event) -> None:
        self._emit(seq.request, event)

    def _emit(self, request: Request, event: Event) -> None:
        if request.loop is not None:  # handed over with the rest of this step's events
            self.outbox[request.loop].append((request.emit, event))
            return
        try:
            request.emit(event)
        except Exception:  # a vanished client must not stop the engine
            log.debug("dropping an event for request %d", request.id, exc_info=True)

    def _deliver(self) -> None:
        """One wake-up of each asyncio loop per step, however many events it carries."""
        for loop, items in self.outbox.items():
            try:
                loop.call_soon_threadsafe(_run_all, items)
            except RuntimeError:  # the loop has closed (the server is gone)
                log.debug("dropping %d events for a closed loop", len(items))
        self.outbox.clear()

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
                    self._emit(request, Event(index, finish_reason="error", error=message))


def _run_all(items: list) -> None:
    for emit, event in items:
        try:
            emit(event)
        except Exception:  # a vanished client must not stop the others
            log.debug("dropping an event", exc_info=True)


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
