"""`longfit serve` end to end over real sockets: uvicorn in a background thread, tiny-llama in fp32.

The references are LLM instances with the same random weights, run one request at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from longfit import SamplingParams
from longfit.config import EngineConfig
from longfit.engine.async_engine import AsyncLLMEngine
from longfit.server.app import build_app
from tests.conftest import make_tiny_llm, smollm2_installed

MODEL = "tiny-llama"
OPTIONS = {"dtype": "float32", "block_size": 8, "max_num_batched_tokens": 64, "max_num_seqs": 16}
MAX_BYTES = 2**20
API_KEY = "sk-test-secret"


@dataclass
class Served:
    url: str
    engine: AsyncLLMEngine
    http: httpx.Client  # NOTE: one client for all calls: building one costs ~50 ms (its SSL context)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.http.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(self.url + path, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        text = self.get("/metrics").text
        match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name}{labels} missing from /metrics"
        return float(match.group(1))

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll the engine (on its own thread) until no request is left; return its state."""

        async def state():
            return await self.engine.call(lambda e: {"used": e.kv_manager.pool.num_used_blocks,
                                                     "requests": len(e.scheduler.requests),
                                                     "busy": e.has_unfinished_requests()})

        deadline = time.monotonic() + timeout
        while True:
            now = asyncio.run(state())
            if not now["busy"] or time.monotonic() > deadline:
                return now
            time.sleep(0.02)


@contextlib.contextmanager
def serve(api_key: str | None = None, **engine_options):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(MODEL, **{**OPTIONS, **engine_options}))
    app = build_app(engine, MODEL, api_key=api_key, max_request_bytes=MAX_BYTES)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(timeout=30) as http:
            yield Served(f"http://127.0.0.1:{port}", engine, http)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


@pytest.fixture(scope="module")
def server():
    with serve() as served:
        yield served


@pytest.fixture(scope="module")
def reference():
    return make_tiny_llm(max_num_seqs=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), "SSE events end with a blank line"
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: "):] for event in events]


# ---------------------------------------------------------------- the openai client
def test_openai_completions(client, reference):
    prompt = "The cache"
    expected = reference.generate(prompt, greedy(10))[0].outputs[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    (choice,) = result.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt), 10)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_n_and_seed(client):
    result = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=6, n=3, temperature=1.0,
                                       seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage.completion_tokens == 36 and result.usage.prompt_tokens == 6
    again = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=6, n=3, temperature=1.0,
                                      seed=7, extra_body={"ignore_eos": True})
    by_index = lambda r: [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert by_index(result) == by_index(again)
    assert len(set(by_index(result)[:3])) > 1, "seeded samples of one prompt differ (seed + index)"
    streamed = list(client.completions.create(model=MODEL, prompt="one", max_tokens=6, n=3, temperature=1.0, seed=7,
                                              stream=True, extra_body={"ignore_eos": True}))
    texts = {i: "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)}
    assert [texts[i] for i in range(3)] == by_index(result)[:3]


@contextlib.contextmanager
def one_step_per_chunk(served: Served):
    """Slow every engine step a little so the consumer reads each step's output on its own (no coalescing)."""
    inner = served.engine.engine
    original = inner.step

    def step():
        outputs = original()
        time.sleep(0.01)
        return outputs

    inner.step = step
    try:
        yield
    finally:
        del inner.step  # back to the class's method


@pytest.mark.parametrize("stream", [False, True])
def test_openai_stop_strings(server, client, reference, stream):
    prompt = "stop strings"
    free = reference.generate(prompt, greedy(24))[0].outputs[0].text
    # Two printable ASCII characters: the stream must hold back the first while the second may complete the match
    # (an undecodable byte would be held back by the detokenizer anyway).
    start = next(i for i in range(3, len(free) - 1) if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
    stop = free[start:start + 2]
    expected = free[:free.find(stop)]
    with one_step_per_chunk(server):
        result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                           stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(result)
            assert len(chunks) > 3, "text arrived in several chunks"
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = result.choices[0].text, result.choices[0].finish_reason
    assert (text, reason) == (expected, "stop")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24,
                                          temperature=0, stop=stop, stream=stream, extra_body={"ignore_eos": True})
    expected_chat = reference.chat([{"role": "user", "content": prompt}], greedy(24, stop=[stop]))[0].outputs[0]
    text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices) if stream else \
        chat.choices[0].message.content
    assert text == expected_chat.text


def test_openai_logprobs_match_the_engine(client, reference):
    prompt = "logprobs"
    expected = reference.generate(prompt, greedy(6, logprobs=3))[0].outputs[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert logprobs.tokens == [bytes([t]).decode("utf-8", "replace") for t in expected.token_ids]
    for token_id, got, entry, top in zip(expected.token_ids, logprobs.token_logprobs, expected.logprobs,
                                         logprobs.top_logprobs):
        assert got == pytest.approx(entry[token_id].logprob, abs=1e-5)
        expected_top: dict[str, float] = {}  # keyed by token text: byte tokens that are not UTF-8 share "\ufffd"
        for top_id, logprob in sorted(entry.items(), key=lambda kv: kv[1].rank):
            expected_top.setdefault(bytes([top_id]).decode("utf-8", "replace"), logprob.logprob)
        assert top == pytest.approx(expected_top, abs=1e-5) and len(entry) >= 3
        assert max(top.values()) == pytest.approx(got, abs=1e-5)  # greedy picks the top token
    assert logprobs.text_offset == list(range(6))
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert [lp for c in streamed for lp in c.choices[0].logprobs.token_logprobs] == logprobs.token_logprobs


def test_openai_echo_scores_the_prompt(client, reference):
    """lm-eval-harness's loglikelihood call: echo + logprobs + max_tokens 0."""
    prompt = "Score this prompt"
    expected = reference.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice = result.choices[0]
    assert choice.text == prompt and result.usage.completion_tokens == 0
    assert choice.logprobs.tokens == list(prompt)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    for token_id, got, entry in zip(expected.prompt_token_ids[1:], choice.logprobs.token_logprobs[1:],
                                    expected.prompt_logprobs[1:]):
        assert got == pytest.approx(entry[token_id].logprob, abs=1e-5)
    with_output = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert with_output.choices[0].text.startswith(prompt) and len(with_output.choices[0].text) > len(prompt)


def test_openai_chat(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    expected = reference.chat(messages, greedy(8, logprobs=2))[0]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, n=2,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.message.content for c in result.choices] == [expected.outputs[0].text] * 2
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids) and result.usage.completion_tokens == 16
    content = result.choices[0].logprobs.content
    assert len(content) == 8 and all(len(entry.top_logprobs) == 2 for entry in content)
    for token_id, entry, position in zip(expected.outputs[0].token_ids, content, expected.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-5)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_openai_structured_output(client):
    """response_format (OpenAI) and guided_* (vLLM) through the openai client, streamed and not."""
    schema = {"type": "object", "properties": {"kind": {"enum": ["page", "block"]}, "ok": {"type": "boolean"}},
              "required": ["kind", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "state?"}],
                                           max_tokens=60, temperature=0, response_format=fmt)
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"kind", "ok"} and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "state?"}],
                                                 max_tokens=60, temperature=0, response_format=fmt, stream=True))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == answer
    anything = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "json"}],
                                              max_tokens=200, temperature=0.8, seed=3,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    phone = client.completions.create(model=MODEL, prompt="Call", max_tokens=20, temperature=1.0, seed=1, n=3,
                                      extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) for c in phone.choices)
    pick = client.completions.create(model=MODEL, prompt="Pick", max_tokens=20, temperature=0,
                                     extra_body={"guided_choice": ["red", "green", "blue"]})
    assert pick.choices[0].text in ("red", "green", "blue")
    forced = client.completions.create(model=MODEL, prompt="Pick", max_tokens=4, temperature=0,
                                       logit_bias={str(ord("Q")): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "QQQQ"


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": "wire", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------- batching, disconnects, memory pressure
def _stream_all(url: str, requests: list[dict]) -> list[tuple[str, int, dict]]:
    """Run streaming completions concurrently with the async openai client; (text, tokens seen, usage) each."""

    async def one(client: openai.AsyncOpenAI, request: dict):
        stream = await client.completions.create(model=MODEL, stream=True, temperature=0, logprobs=0,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}, **request)
        text, num_tokens, usage = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                num_tokens += len(chunk.choices[0].logprobs.tokens)
            usage = chunk.usage or usage
        return text, num_tokens, usage.model_dump()

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, r) for r in requests))

    return asyncio.run(run())


def test_32_concurrent_streams_equal_each_request_alone(server, reference):
    requests = [{"prompt": f"request {i} " + "x" * (i % 7), "max_tokens": 8 + i % 9} for i in range(32)]
    results = _stream_all(server.url, requests)
    for request, (text, num_tokens, usage) in zip(requests, results):
        (alone,) = reference.generate(request["prompt"], greedy(request["max_tokens"]))
        assert num_tokens == usage["completion_tokens"] == request["max_tokens"]
        assert text == alone.outputs[0].text
    assert server.wait_idle()["used"] == 0


def test_disconnects_and_aborts_return_blocks(server):
    idle = server.wait_idle()["used"]
    aborted_before = server.metric("longfit_requests_total", '{status="aborted"}')
    body = {"model": MODEL, "prompt": "disconnect " * 3, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

            async def stream_then_leave():
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    seen = 0
                    async for line in response.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen == 3:
                            return  # closing the response mid-stream drops the connection

            async def wait_then_leave():
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/v1/completions", json=body, timeout=0.5)

            await asyncio.gather(*(stream_then_leave() for _ in range(3)), *(wait_then_leave() for _ in range(2)))

    started = time.monotonic()
    asyncio.run(run())
    state = server.wait_idle()
    assert state == {"used": idle, "requests": 0, "busy": False}
    assert time.monotonic() - started < 8, "requests ran to max_tokens instead of being aborted"
    assert server.metric("longfit_kv_blocks_used") == idle
    assert server.metric("longfit_requests_total", '{status="aborted"}') - aborted_before == 5


def test_preemption_keeps_outputs_identical(reference):
    # 40 pages of 8 tokens per layer (page 0 is the null page): one request needs at most 2 x 7, eight need 112.
    requests = [{"prompt": f"pressure {i}", "max_tokens": 40} for i in range(8)]
    with serve(max_num_seqs=8, memory_bytes=40 * 2048) as pressured:
        assert pressured.metric("longfit_kv_blocks_total") == 39
        results = _stream_all(pressured.url, requests)
        assert pressured.metric("longfit_num_preemptions_total") > 0
        assert pressured.wait_idle()["used"] == 0
    for request, (text, num_tokens, _) in zip(requests, results):
        assert num_tokens == 40
        assert text == reference.generate(request["prompt"], greedy(40))[0].outputs[0].text


def test_shared_prefix_is_computed_once(server):
    prefix = "".join(random.Random(0).choice("abcdefghij klmnop") for _ in range(1000))
    prompts = [prefix + f" question {i}?" for i in range(4)]
    hits_before = server.metric("longfit_prefix_cache_hits_total")
    first = server.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 6, "temperature": 0,
                                                 "ignore_eos": True}).json()
    rest = _stream_all(server.url, [{"prompt": p, "max_tokens": 6} for p in prompts[1:]])
    hits = server.metric("longfit_prefix_cache_hits_total") - hits_before
    assert hits >= 3 * (1000 // 8) * 8, "the three later requests reuse the first one's prefix blocks"
    assert server.metric("longfit_prefix_cache_hit_rate") > 0
    uncached = make_tiny_llm(max_num_seqs=16, enable_prefix_caching=False)
    expected = [o.outputs[0].text for o in uncached.generate(prompts, greedy(6))]
    assert [first["choices"][0]["text"]] + [text for text, _, _ in rest] == expected


def test_kv_compression_field_reaches_the_engine(server):
    bad = server.post("/v1/completions", json={"prompt": "x", "kv_compression": "no-such-method"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_compression"
    assert "no-such-method" in bad.json()["error"]["message"]


def test_engine_failure_fails_only_that_request(server):
    runner = server.engine.engine.runner
    poison = list(b"POISON")

    def execute(scheduled, _original=runner.execute):
        if any(item.prompt_token_ids == poison for item in scheduled.scheduled):
            raise RuntimeError("injected runner failure")
        return _original(scheduled)

    errors_before = server.metric("longfit_requests_total", '{status="error"}')
    runner.execute = execute
    try:
        failed = server.post("/v1/completions", json={"prompt": poison, "max_tokens": 4})
        streamed = server.post("/v1/completions", json={"prompt": poison, "max_tokens": 4, "stream": True})
        healthy = server.post("/v1/completions", json={"prompt": "fine", "max_tokens": 4, "ignore_eos": True})
    finally:
        del runner.execute
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and "injected runner failure" in json.loads(events[-2])["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 4
    assert server.metric("longfit_requests_total", '{status="error"}') - errors_before == 2
    assert server.wait_idle()["used"] == 0


# ---------------------------------------------------------------- invalid input
LONG_PROMPT = "y" * 2100  # tiny-llama's context is 2048 tokens (1 byte = 1 token)
BAD_REQUESTS = [
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": "a"}, 400, "frequency_penalty"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "n": 1.5}, 400, "n"),
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"prompt": "x", "seed": -3}, 400, "seed"),
    ("completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "x", "logit_bias": {"five": 1.0}}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"300": 1}}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": [5]}, 400, "logit_bias"),
    ("completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("completions", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("completions", {"prompt": "x", "kv_compression": 5}, 400, "kv_compression"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [[]]}, 400, "prompt"),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("completions", {"prompt": [300]}, 400, "prompt"),
    ("completions", {"prompt": [-1]}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("completions", {"prompt": ["x"] * 300, "n": 4}, 400, "prompt"),
    ("completions", [1, 2], 400, "body"),
    ("completions", "just a string", 400, "body"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
     400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, 400,
     "response_format.json_schema.schema"),
    ("completions", {"prompt": "x", "guided_regex": "[a-"}, 400, "guided_regex"),
    ("completions", {"prompt": "x", "guided_regex": 5}, 400, "guided_regex"),
    ("completions", {"prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ("completions", {"prompt": "x", "guided_json": "{not json"}, 400, "guided_json"),
    ("completions", {"prompt": "x", "guided_grammar": "start: missing_rule"}, 400, "guided_grammar"),
    ("completions", {"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, 400, "guided_choice"),
    ("completions", {"prompt": "x", "guided_regex": "a+", "min_tokens": 3}, 400, "min_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS, ids=[f"{i}-{r[3]}" for i, r in
                                                                       enumerate(BAD_REQUESTS)])
def test_bad_request_gets_its_4xx(server, route, body, status, param):
    response = server.post(f"/v1/{route}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize("raw", [b"{bad json", b'{"prompt": "x",}', b"\xff\xfe", b"[" * 100000, b"",
                                 b'{"prompt": "lone surrogate \\udcff"}', b'{"prompt": "x", "stop": "\\ud800"}'])
def test_malformed_json_is_400(server, raw):
    response = server.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_body_too_large_is_413(server):
    big = json.dumps({"prompt": "z" * (MAX_BYTES + 10)}).encode()
    assert server.post("/v1/completions", content=big).status_code == 413

    def chunked():  # no Content-Length: the limit applies while the body streams in
        for _ in range(40):
            yield b" " * 65536

    response = server.post("/v1/completions", content=chunked())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert server.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert server.get("/v1/completions").status_code == 405


def test_random_inputs_never_give_5xx(server):
    rng = random.Random(1)
    values = [None, True, 0, 1, -1, 2, 0.5, 1e308, -1e308, 2**64, "", "x", [], [1], ["a"], [[1, 2]], {}, {"a": 1}]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs",
              "echo", "stream", "presence_penalty", "repetition_penalty", "stream_options", "model", "messages"]
    for attempt in range(120):
        body = {"prompt": "fuzz", "max_tokens": 2}
        for field in rng.sample(fields, 3):
            body[field] = rng.choice(values)
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 2:
            body["max_tokens"] = rng.choice([2, "2", 2.5, None]) if attempt % 3 else 2  # chat: None = whole context
        route = "chat/completions" if attempt % 3 == 0 else "completions"
        response = server.post(f"/v1/{route}", json=body)
        assert response.status_code < 500, (body, response.text)
    assert server.get("/health").json() == {"status": "ok"}
    assert server.wait_idle()["used"] == 0


# ---------------------------------------------------------------- auth, queue, endpoints
@pytest.fixture(scope="module")
def guarded():
    with serve(api_key=API_KEY, max_num_seqs=1, max_queue=1) as served:
        yield served


def test_api_key_is_required_on_v1_routes(guarded):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert guarded.get("/v1/models", headers=headers).status_code == 401
        response = guarded.post("/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/health").status_code == 200 and guarded.get("/metrics").status_code == 200
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.models.list().data[0].id == MODEL
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_queue_full_is_429_with_retry_after(guarded):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "busy", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(base_url=guarded.url, headers=headers, timeout=30) as http, \
                http.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
            # NOTE: no `break` out of aiter_lines: dropping the iterator closes the connection (a disconnect).
            lines = running.aiter_lines()
            while not (await lines.__anext__()).startswith("data: "):
                pass  # once a token arrived it runs; max_num_seqs=1 keeps the next request waiting
            waiting = asyncio.create_task(http.post("/v1/completions", json=body))
            for _ in range(400):  # until the engine has queued it (a loaded machine can take a while)
                if guarded.engine.stats.get("num_waiting", 0) >= 1:
                    break
                await asyncio.sleep(0.025)
            refused = await http.post("/v1/completions", json={**body, "max_tokens": 1})
            waiting.cancel()  # a client that gives up: the server aborts its request
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert guarded.wait_idle()["used"] == 0
    assert guarded.metric("longfit_requests_total", '{status="rejected"}') == 1


def test_models_health_and_metrics(server):
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 2048
    assert server.get("/health").json() == {"status": "ok"}
    text = server.get("/metrics").text
    for name in ("longfit_requests_total", "longfit_prompt_tokens_total", "longfit_generation_tokens_total",
                 "longfit_time_to_first_token_seconds_bucket", "longfit_time_per_output_token_seconds_bucket",
                 "longfit_inter_token_latency_seconds_bucket", "longfit_e2e_request_latency_seconds_bucket",
                 "longfit_num_requests_running", "longfit_num_requests_waiting", "longfit_kv_blocks_used",
                 "longfit_kv_blocks_free", "longfit_prefix_cache_hit_rate", "longfit_num_preemptions_total"):
        assert re.search(rf"^{name}[{{ ]", text, re.MULTILINE), name
    assert server.metric("longfit_requests_total", '{status="success"}') > 0
    assert server.metric("longfit_time_to_first_token_seconds_count") > 0


# ---------------------------------------------------------------- the real model (a couple of checks)
@pytest.mark.real_model
@pytest.mark.skipif(not smollm2_installed(), reason="SmolLM2 weights are not installed")
def test_real_model_chat_and_scoring():
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs("smollm2-135m", max_num_seqs=4,
                                                                 memory_bytes=64 * 2**20))
    app = build_app(engine, "smollm2-135m")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12,
                                               temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.prompt_tokens == len(engine.tokenizer.encode_chat(messages))
        likely = client.completions.create(model="smollm2-135m", prompt="The capital of France is Paris",
                                           max_tokens=0, echo=True, logprobs=1)
        unlikely = client.completions.create(model="smollm2-135m", prompt="The capital of France is soup",
                                             max_tokens=0, echo=True, logprobs=1)
        assert likely.choices[0].logprobs.token_logprobs[-1] > unlikely.choices[0].logprobs.token_logprobs[-1] + 3
        # Structured output on the real tokenizer (byte-level BPE): a schema the free answer does not follow.
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                  "required": ["name", "age"], "additionalProperties": False}
        person = client.chat.completions.create(
            model="smollm2-135m", max_tokens=40, temperature=0,
            messages=[{"role": "user", "content": "Give a JSON object for a person named Alice who is 30."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        assert json.loads(person.choices[0].message.content) == {"name": "Alice", "age": 30}
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()
