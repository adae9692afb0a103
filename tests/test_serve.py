"""`verlite serve`: a real server subprocess on 127.0.0.1 spoken to with the official openai client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import run_cli
from serve_fixtures import Server, served_models
from verlite.inference import generate, load_model_and_tokenizer

KEY = "test-secret"
PROMPTS = [f"计算 {i} + {i + 1} 的结果是多少?" for i in range(12)] + ["hello", "the quick brown fox", "lazy dog"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_chat):
    return served_models(tmp_path_factory, tokenizer_chat)


@pytest.fixture(scope="module")
def references(models):
    """Greedy text of every (model, prompt) through `verlite generate`'s own path."""
    refs = {}
    for name in ("base", "a", "b"):
        model, tok = load_model_and_tokenizer(str(models[name]), device="cpu")
        for prompt, text in zip(PROMPTS, generate(model, tok, PROMPTS, max_new_tokens=MAX_TOKENS)):
            refs[name, prompt] = text
    return refs


@pytest.fixture(scope="module")
def server(models):
    srv = Server("--checkpoint", str(models["base"]), "--served_model_name", "base", "--lora", f"a={models['a']}",
                 "--lora", f"b={models['b']}", "--max_num_seqs", "4", "--max_model_len", "256",
                 "--max_queue", "512", env={"VERLITE_API_KEY": KEY})
    yield srv
    code, printed = srv.stop()
    assert code == 0, printed[-3000:]


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(c, model, prompt, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                     max_tokens=MAX_TOKENS, temperature=0, **kw)


def test_prompts_give_different_answers(references):
    # Otherwise the mixing tests below could not tell answers apart.
    assert len(set(references.values())) >= 0.9 * len(references)


def test_api_key_and_models(server):
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    response = httpx.get(server.url + "/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert [m.id for m in client(server).models.list().data] == ["base", "a", "b"]


def test_greedy_equals_generate_for_base_and_both_adapters(server, models, references):
    c = client(server)
    for name in ("base", "a", "b"):
        for prompt in PROMPTS[:3]:
            reply = chat(c, name, prompt)
            assert reply.choices[0].message.content.strip() == references[name, prompt], (name, prompt)
            assert reply.usage.completion_tokens == MAX_TOKENS or reply.choices[0].finish_reason == "stop"
            assert reply.usage.prompt_tokens > 0
            assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        done = c.completions.create(model=name, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0)
        assert done.choices[0].text.strip() == references[name, PROMPTS[4]] and done.usage.completion_tokens > 0
        pieces, usage = [], None
        for chunk in chat(c, name, PROMPTS[5], stream=True):
            pieces += [ch.delta.content or "" for ch in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces).strip() == references[name, PROMPTS[5]]
        assert usage is not None and usage.completion_tokens > 0
    # And the `verlite generate` command itself, on an adapter.
    result = run_cli("generate", "--checkpoint", str(models["b"]), PROMPTS[1], "--max_new_tokens", str(MAX_TOKENS),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == chat(c, "b", PROMPTS[1]).choices[0].message.content.strip()


def test_200_requests_from_16_clients_are_not_mixed_up(server, references):
    c = client(server)
    jobs = [(("base", "a", "b")[i % 3], PROMPTS[(i * 7) % len(PROMPTS)], i % 4 == 0) for i in range(200)]

    def ask(job):
        name, prompt, stream = job
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in chat(c, name, prompt, stream=True)
                           if ch.choices)
        return chat(c, name, prompt).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    wrong = [(job, got) for job, got in zip(jobs, answers) if got.strip() != references[job[0], job[1]]]
    assert not wrong, wrong[:3]


def test_sampling_seed_n_and_stop(server, references):
    c = client(server)
    kw = dict(model="a", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=MAX_TOKENS, temperature=1.0)
    first = c.chat.completions.create(seed=7, n=2, **kw)
    again = c.chat.completions.create(seed=7, n=2, **kw)
    assert [ch.message.content for ch in first.choices] == [ch.message.content for ch in again.choices]
    assert len(first.choices) == 2 and first.choices[0].message.content != first.choices[1].message.content
    assert 2 <= first.usage.completion_tokens <= 2 * MAX_TOKENS
    other = c.chat.completions.create(seed=8, n=1, **kw)
    assert other.choices[0].message.content == first.choices[1].message.content  # choice i samples with seed + i
    text = references["a", PROMPTS[2]]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = chat(c, "a", PROMPTS[2], stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content.strip() == text[:text.find(stop)].strip()
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chat(c, "a", PROMPTS[2], stop=stop, stream=True)
                       if ch.choices)
    assert streamed == cut.choices[0].message.content


BAD = [  # (body, status, param)
    ("{not json", 400, None),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "a", "messages": [{"role": "user", "content": "hello " * 300}]}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "a", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ({"model": "a", "messages": "hi"}, 400, "messages"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, None),
    ([1, 2], 400, None),
]


def test_every_bad_request_gets_an_openai_error(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, status, param in BAD:
        raw = body if isinstance(body, str) else json.dumps(body)
        response = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=30)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], body
        if param:
            assert (error["param"] or "").startswith(param), (body, error)
    response = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": 7}, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("prompt")
    response = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert response.status_code == 404 and "error" in response.json()
    # Nothing is stuck: the server still answers and no slot is held.
    assert chat(client(server), "a", "hi").choices[0].message.content is not None
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_disconnect_mid_stream_frees_the_slot(server, references):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 240,
            "ignore_eos": True, "stream": True}
    # Fill all 4 slots with long streams, read a little of each, then hang up.
    for _ in range(4):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {") or False:
                pass
            next(lines)
    # The others are not stalled: a new request takes a freed slot and finishes.
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=chat(client(server), "b", PROMPTS[0])))
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and result["r"].choices[0].message.content.strip() == references["b", PROMPTS[0]]
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_queue_limit_then_sigterm_drains(models):
    srv = Server("--checkpoint", str(models["base"]), "--max_num_seqs", "1", "--max_queue", "1",
                 "--max_model_len", "1024")
    name = str(models["base"])
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600, "ignore_eos": True}
    results = {}

    def stream_all():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    try:
        first = threading.Thread(target=stream_all)
        first.start()
        while httpx.get(srv.url + "/health").json()["running"] < 1:
            time.sleep(0.05)
        second = threading.Thread(target=lambda: results.update(
            queued=httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=120)))
        second.start()
        while httpx.get(srv.url + "/health").json()["waiting"] < 1:
            time.sleep(0.05)
        over = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
    finally:
        code, printed = srv.stop()  # SIGTERM while one streams and one waits
    first.join(10)
    second.join(10)
    assert code == 0, printed[-3000:]
    assert results["stream"][-1] == "data: [DONE]"
    usage = json.loads(results["stream"][-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 600
    assert results["queued"].status_code == 200 and results["queued"].json()["usage"]["completion_tokens"] == 5
