"""verlite/serve/ in process: the slot runner against the model's own forward (batched
multi-LoRA included), the engine's scheduling, sampling and stop strings."""

from __future__ import annotations

import threading

import pytest
import torch

from serve_fixtures import served_models
from verlite.serve.engine import Engine, QueueFull, Request
from verlite.serve.runner import SlotRunner
from verlite.serve.sampling import SamplingParams, TextStream, sample, top_p_filter


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_chat):
    return served_models(tmp_path_factory, tokenizer_chat)


def test_mixed_adapters_in_one_batch_match_peft(models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    runner = SlotRunner(base, num_slots=4, max_model_len=64, adapters={"a": models["a"], "b": models["b"]})
    for slot in range(4):  # blocks in a scattered order, as after requests came and went
        runner.assign(slot, [1 + slot + 4 * b for b in range(runner.blocks_per_seq)])
    prompts = [[5, 17, 42, 99, 3], [8, 61, 7], list(range(60, 80)), [40, 41]]  # 20 tokens: two blocks
    adapters = [2, 0, 1, 2]  # b, base, a, b: every kind in one batch
    slots = [3, 0, 2, 1]
    first = runner.prefill(slots, prompts, adapters)
    # One decode step for all four slots at their own positions.
    tokens, positions, slot_adapter = [0] * 4, [0] * 4, [0] * 4
    for slot, prompt, adapter in zip(slots, prompts, adapters):
        tokens[slot], positions[slot], slot_adapter[slot] = 23, len(prompt), adapter
    second = runner.decode(tokens, positions, slot_adapter)
    reference = {0: base}
    for i, name in enumerate(("a", "b"), start=1):
        reference[i] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]),
                                                 str(models[name])).eval()
    with torch.no_grad():
        for row, (slot, prompt, adapter) in enumerate(zip(slots, prompts, adapters)):
            logits = reference[adapter](input_ids=torch.tensor([prompt + [23]])).logits[0]
            torch.testing.assert_close(first[row], logits[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(second[slot], logits[-1], rtol=1e-4, atol=1e-4)
    # The adapters really change the output (otherwise this test would prove nothing).
    assert not torch.allclose(reference[1](input_ids=torch.tensor([prompts[0]])).logits,
                              base(input_ids=torch.tensor([prompts[0]])).logits, atol=1e-3)


def run_alone(base, tokenizer, prompt, max_tokens):
    engine = Engine(SlotRunner(base, num_slots=1, max_model_len=128), tokenizer, stop_ids=[])
    events, done = [], threading.Event()
    engine.submit(Request(prompt, SamplingParams(max_tokens=max_tokens), 0,
                          lambda e: (events.append(e), e.finish_reason and done.set())))
    assert done.wait(60)
    engine.stop()
    return "".join(e.text for e in events)


def test_engine_joins_and_retires_requests_between_steps(models, tokenizer_chat):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    engine = Engine(SlotRunner(base, num_slots=2, max_model_len=128), tokenizer_chat, stop_ids=[], max_queue=4)
    events: dict[int, list] = {i: [] for i in range(4)}
    all_done = threading.Semaphore(0)

    def job(i):
        def emit(event):
            events[i].append(event)
            if event.finish_reason:
                all_done.release()
        return Request([5, 6, 10 + i], SamplingParams(max_tokens=3 + 4 * i), 0, emit)

    with engine.cond:  # the engine thread cannot take any while we hold its lock
        for i in range(4):
            engine.submit(job(i))
        with pytest.raises(QueueFull):
            engine.submit(job(9))
    for _ in range(4):  # 4 requests through 2 slots: the later ones join as earlier ones leave
        assert all_done.acquire(timeout=60)
    engine.stop()
    for i in range(4):
        assert events[i][-1].finish_reason == "length" and events[i][-1].completion_tokens == 3 + 4 * i
    # Greedy text does not depend on what else shared the batch.
    assert "".join(e.text for e in events[3]) == run_alone(base, tokenizer_chat, [5, 6, 13], 15)


def test_kv_blocks_bound_admission(models, tokenizer_chat):
    from transformers import AutoModelForCausalLM

    from verlite.serve.engine import TooLarge

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    engine = Engine(SlotRunner(base, num_slots=2, max_model_len=128, num_blocks=1 + 8), tokenizer_chat, stop_ids=[])
    with pytest.raises(TooLarge):  # 3 + 200 tokens > the 128 the cache holds
        engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=200), 0, lambda e: None))
    events: dict[int, list] = {0: [], 1: []}
    done = threading.Semaphore(0)
    for i in range(2):  # 5 blocks each, 8 in all: the second waits for the first's blocks
        engine.submit(Request([5, 6, 7 + i], SamplingParams(max_tokens=70), 0,
                              lambda e, i=i: (events[i].append(e), e.finish_reason and done.release())))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    engine.stop()
    assert all(events[i][-1].completion_tokens == 70 for i in range(2))
    assert "".join(e.text for e in events[1]) == run_alone(base, tokenizer_chat, [5, 6, 8], 70)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(models, tokenizer_chat):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    runner = SlotRunner(base, num_slots=2, max_model_len=64)
    engine = Engine(runner, tokenizer_chat, stop_ids=[])
    real, events, done = runner.step, [], threading.Semaphore(0)

    def broken(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    runner.step = broken
    engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=5, n=2), 0,
                          lambda e: (events.append(e), e.finish_reason and done.release())))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert sorted(e.index for e in events if e.error) == [0, 1] and "out of memory" in events[-1].error
    runner.step = real
    later = []
    engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=5), 0,
                          lambda e: (later.append(e), e.finish_reason and done.release())))
    assert done.acquire(timeout=60)
    engine.stop()
    assert later[-1].finish_reason == "length"
    assert len(engine.free_blocks) == runner.num_blocks - 1 and len(engine.free) == 2  # nothing leaked


def test_sampling_rules():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    generator = torch.Generator().manual_seed(0)
    picks = sample(logits, [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [None, None, generator]).tolist()
    assert picks[:2] == [1, 0]
    again = sample(logits, [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [None, None, torch.Generator().manual_seed(0)]).tolist()
    assert picks == again
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, torch.tensor([0.7]))
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p small enough keeps the single most likely token: sampling becomes greedy.
    tiny = [int(sample(logits[:1], [1.0], [0.01], [None])[0]) for _ in range(20)]
    assert set(tiny) == {1}


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer_chat):
    ids = tokenizer_chat("答案是42, done", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer_chat, stop=[", do"])
    sent, stopped = "", False
    for token in ids:
        piece, stopped = stream.add(token)
        sent += piece
        assert "\ufffd" not in piece
        if stopped:
            break
    assert stopped and sent == "答案是42"
    plain = TextStream(tokenizer_chat, stop=[])
    text = "".join(plain.add(t)[0] for t in ids) + plain.flush()
    assert text == "答案是42, done"


def test_create_app_embeds_in_process(models, tokenizer_chat):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from verlite.inference import generate, load_model_and_tokenizer
    from verlite.serve import create_app

    app, served = FastAPI(), create_app(str(models["base"]), loras={"a": str(models["a"])},
                                        served_model_name="base", device="cpu", max_num_seqs=2, max_model_len=128)
    app.mount("/llm", served)  # a mounted app's startup does not run: the engine starts on first use
    with TestClient(app) as client:
        reply = client.post("/llm/v1/chat/completions", json={
            "model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6})
        assert reply.status_code == 200, reply.text
        model, tok = load_model_and_tokenizer(str(models["a"]), device="cpu")
        assert reply.json()["choices"][0]["message"]["content"].strip() == generate(model, tok, "hello",
                                                                                    max_new_tokens=6)
        assert client.get("/llm/v1/models").json()["data"][1]["id"] == "a"
    served.state.served.engine.stop()


def test_an_adapter_checkpoint_is_served_beside_its_base(models, tokenizer_chat):
    from verlite.serve import load_served

    served = load_served(str(models["a"]), device="cpu", max_num_seqs=1, max_model_len=64)
    assert served.models == {str(models["base"]): 0, str(models["a"]): 1}  # base under the name it records
    named = load_served(str(models["a"]), served_model_name="sft", loras={"b": str(models["b"])}, device="cpu",
                        max_num_seqs=1, max_model_len=64)
    assert named.models == {str(models["base"]): 0, "sft": 1, "b": 2}


def test_serve_command_rejects_bad_arguments(models):
    from conftest import run_cli

    result = run_cli("serve", "--checkpoint", str(models["base"]), "--lora", "nameonly")
    assert result.returncode == 2 and "--lora nameonly: write it as NAME=PATH" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("serve", "--checkpoint", str(models["base"]), "--lora", f"x={models['base']}", "--device", "cpu")
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr


class Replay:
    """Stands in for a captured CUDA graph on CPU: replay() reruns the step from the runner's
    static inputs into one fixed output tensor, as a graph does, so the engine's handling of
    static buffers (outputs overwritten by the next replay) is exercised without a GPU."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def fake_graphs(runner):
    vocab = runner.model.config.vocab_size
    for keys in runner.buckets():
        replay = Replay(lambda keys=keys: runner._decode_step(keys), torch.zeros(runner.num_slots, vocab))
        runner.graphs[keys] = (replay, replay.out)
    for r in runner.prefill_rows():
        for w in runner.prefill_widths():
            replay = Replay(lambda r=r, w=w: runner._prefill_step(runner.p_ids[:r * w].view(r, w), runner.p_lengths[:r],
                                                                  runner.p_slots[:r], runner.p_adapters[:r]),
                            torch.zeros(r, vocab))
            runner.prefill_graphs[r, w] = (replay, replay.out)


def test_engine_over_replayed_steps_gives_the_eager_texts(models, tokenizer_chat):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    texts = []
    for replayed in (False, True):
        runner = SlotRunner(base, num_slots=4, max_model_len=128, adapters={"a": models["a"]})
        if replayed:
            fake_graphs(runner)
        engine = Engine(runner, tokenizer_chat, stop_ids=[])
        events, done = {}, threading.Semaphore(0)
        jobs = [([5, 6, 7], SamplingParams(max_tokens=12), 0), ([9, 8, 7, 6, 5, 4], SamplingParams(max_tokens=20), 1),
                ([11, 12], SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=3, n=2), 1),
                ([40, 41, 42], SamplingParams(max_tokens=15), 0)]
        for i, (prompt, params, adapter) in enumerate(jobs):
            engine.submit(Request(prompt, params, adapter, lambda e, i=i: (events.setdefault((i, e.index), []).append(e),
                                                                           e.finish_reason and done.release())))
        for _ in range(5):
            assert done.acquire(timeout=60)
        engine.stop()
        texts.append({k: "".join(e.text for e in v) for k, v in events.items()})
        assert all(v[-1].finish_reason == "length" for v in events.values())
    assert texts[0] == texts[1] and len(texts[0]) == 5


def test_prefill_padded_to_a_captured_shape_gives_the_same_logits(models):
    """The GPU replays prefills at padded (rows, width) shapes from static buffers, padding rows
    writing to the scratch row. On CPU each "graph" here runs the same step eagerly from those
    buffers, so the padding and buffer logic is checked against the unpadded prefill."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    runner = SlotRunner(base, num_slots=4, max_model_len=64, adapters={"a": models["a"]})
    prompts, slots, adapters = [[5, 17, 42, 99, 3], list(range(60, 80)), [40, 41]], [3, 0, 2], [1, 0, 1]
    for slot in range(4):
        runner.assign(slot, [1 + slot + 4 * b for b in range(runner.blocks_per_seq)])
    plain = runner.prefill(slots, prompts, adapters).clone()
    keys = runner.k_cache.clone()

    fake_graphs(runner)
    runner.graphs.clear()  # prefills only
    assert runner.prefill_shape(3, 20) == (4, 32)
    runner.k_cache.zero_()
    padded = runner.prefill(slots, prompts, adapters)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
    for slot, prompt in zip(slots, prompts):  # each prompt's keys landed where the unpadded run put them
        blocks = runner.block_table[slot, :-(-len(prompt) // 16)]
        written = runner.k_cache[:, blocks].flatten(1, 2)[:, :len(prompt)]
        torch.testing.assert_close(written, keys[:, blocks].flatten(1, 2)[:, :len(prompt)])


def test_events_that_queued_up_are_sent_as_one_chunk_per_choice():
    from verlite.serve.app import merge
    from verlite.serve.engine import Event

    events = [Event(0, "a", completion_tokens=1), Event(1, "x", completion_tokens=1),
              Event(0, "b", completion_tokens=2), Event(0, "c", "length", 3), Event(1, "", "error", 1, error="boom")]
    out = {e.index: e for e in merge(events)}
    assert (out[0].text, out[0].finish_reason, out[0].completion_tokens) == ("abc", "length", 3)
    assert out[1].error == "boom" and out[1].finish_reason == "error"
    assert merge(events[:1]) == events[:1]
