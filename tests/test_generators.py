"""Generators against real backends: a llama.cpp server, a local transformers model,
and the fault tests' scripted HTTP server on loopback (``tests.faults.FakeLLM``) for
failures a real server won't produce on demand (HTTP 500, slowness)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from common.config import Settings
from common.generators import (
    Generation,
    LocalGenerator,
    NoneGenerator,
    OpenAIGenerator,
    build_generator,
    default_local_model_path,
)
from common.prompts import PromptSource, build_messages
from tests.faults import FakeLLM
from tests.llm_server import SKIP_REASON, free_port, llama_cpp_available, start_llama_server

SECRET = "sk-test-secret-never-shown"


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- a scripted OpenAI-compatible server on loopback -----------------------------------


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def fast_client(base_url: str, **overrides: object) -> OpenAIGenerator:
    options: dict = dict(base_url=base_url, api_key=SECRET, model="fake-model", timeout_s=5.0,
                         max_retries=2, backoff_s=0.01, backoff_max_s=0.05)
    options.update(overrides)
    return OpenAIGenerator(**options)


# --- NoneGenerator and build_generator -------------------------------------------------


def test_none_generator_returns_no_text() -> None:
    generator = build_generator(settings(llm_backend="none"))
    assert isinstance(generator, NoneGenerator)
    assert generator.generate([user("a"), user("b")]) == [
        Generation(text=None, model="none", seconds=0.0)
    ] * 2
    assert generator.generate([]) == []


def test_build_generator_openai_takes_the_settings() -> None:
    generator = build_generator(settings(
        llm_backend="openai", llm_base_url="http://127.0.0.1:1/v1/", llm_model="m",
        llm_api_key=SECRET, llm_max_in_flight=4, llm_timeout_s=3, llm_max_retries=1,
    ))
    assert isinstance(generator, OpenAIGenerator)
    assert (generator.base_url, generator.model_name) == ("http://127.0.0.1:1/v1", "m")
    assert (generator.max_in_flight, generator.timeout_s, generator.max_retries) == (4, 3, 1)


# --- OpenAIGenerator against the scripted server ---------------------------------------


def test_unreachable_endpoint_gives_per_item_errors_naming_the_cause() -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    generator = fast_client(base_url, max_retries=2)
    start = time.perf_counter()
    results = generator.generate([user("a"), user("b"), user("c")])
    assert time.perf_counter() - start < 5
    assert len(results) == 3
    for result in results:
        assert result.text is None
        assert result.error == f"connection refused to {base_url} after 3 attempts"
        assert SECRET not in result.error


def test_unreachable_endpoint_without_model_reports_the_model_listing() -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    results = fast_client(base_url, model=None, max_retries=0).generate([user("a")])
    assert results[0].error == f"could not list models: connection refused to {base_url} after 1 attempt"


def test_http_500_is_retried_and_succeeds() -> None:
    with FakeLLM(statuses=[500, 503]) as server:
        [result] = fast_client(server.base_url).generate([user("hello")])
        assert server.posts == 3
    assert result.error is None
    assert result.text == "echo: hello"
    assert (result.model, result.prompt_tokens, result.completion_tokens) == ("fake-model", 7, 3)
    assert server.auth == {f"Bearer {SECRET}"}


def test_http_500_until_retries_run_out() -> None:
    with FakeLLM(statuses=[500, 500, 500]) as server:
        [result] = fast_client(server.base_url).generate([user("hello")])
        assert server.posts == 3
    assert result.text is None
    assert result.error == "HTTP 500: scripted failure 500 (after 3 attempts)"


def test_http_400_is_not_retried() -> None:
    with FakeLLM(statuses=[400]) as server:
        results = fast_client(server.base_url, max_in_flight=1).generate([user("bad"), user("good")])
        assert server.posts == 2
    assert results[0].error == "HTTP 400: scripted failure 400"
    assert results[1].text == "echo: good"


def test_timeout_is_retried_then_reported() -> None:
    with FakeLLM(delay_s=2.0) as server:
        start = time.perf_counter()
        [result] = fast_client(server.base_url, timeout_s=0.3, max_retries=1).generate([user("slow")])
        elapsed = time.perf_counter() - start
    assert result.error == f"timed out after 0.3 s waiting for {server.base_url} (2 attempts)"
    assert elapsed < 1.5


def test_at_most_max_in_flight_requests_and_order_kept() -> None:
    with FakeLLM(delay_s=0.1) as server:
        texts = [f"question {i}" for i in range(10)]
        results = fast_client(server.base_url, max_in_flight=3).generate([user(t) for t in texts])
        assert server.max_in_flight == 3
    assert [r.text for r in results] == [f"echo: {t}" for t in texts]


def test_model_name_comes_from_the_server_when_unset(fake: FakeLLM) -> None:
    generator = fast_client(fake.base_url, model=None)
    [result] = generator.generate([user("hi")])
    assert result.model == "fake-model"
    assert OpenAIGenerator(base_url=fake.base_url).model_name == "fake-model"


def test_generate_works_from_a_worker_thread_and_inside_an_event_loop(fake: FakeLLM) -> None:
    generator = fast_client(fake.base_url)
    out: list[list[Generation]] = []
    worker = threading.Thread(target=lambda: out.append(generator.generate([user("thread")])))
    worker.start()
    worker.join(10)
    assert out[0][0].text == "echo: thread"

    async def caller() -> list[Generation]:
        return generator.generate([user("loop")])

    assert asyncio.run(caller())[0].text == "echo: loop"


# --- OpenAIGenerator against a real llama.cpp server -----------------------------------


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    if not llama_cpp_available():
        pytest.skip(SKIP_REASON)
    with start_llama_server(default_local_model_path()) as base_url:
        yield base_url


def test_llama_server_answers_every_conversation_in_order(llama_url: str) -> None:
    generator = OpenAIGenerator(
        base_url=llama_url, max_tokens=16, temperature=0, max_in_flight=2, timeout_s=60
    )
    assert generator.model_name.endswith(".gguf")  # the first id GET /models lists
    # Conversations of strictly growing length: prompt_tokens must grow with them.
    conversations = [user("Name a cloud service." + " Please answer briefly." * i) for i in range(5)]
    results = generator.generate(conversations)
    assert len(results) == 5
    for result in results:
        assert result.error is None, result.error
        assert isinstance(result.text, str) and result.text.strip()
        assert result.completion_tokens and result.completion_tokens <= 16
    prompt_tokens = [r.prompt_tokens for r in results]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 5
    # Greedy decoding is deterministic: item 3 alone gives the same answer.
    assert generator.generate([conversations[3]])[0].text == results[3].text


def test_llama_server_answers_a_rag_prompt(llama_url: str) -> None:
    hit = PromptSource("ECS quotas", "https://docs.example.com/ecs", "ecs",
                       "Each account may run 50 ECS instances per region.", 0.9)
    messages, used = build_messages("How many ECS instances can I run per region?", [hit])
    [result] = OpenAIGenerator(base_url=llama_url, max_tokens=24, temperature=0).generate([messages])
    assert used == [0]
    assert result.error is None and result.text


# --- LocalGenerator on the SmolLM2 GGUF ------------------------------------------------


@pytest.fixture(scope="module")
def local() -> Iterator[LocalGenerator]:
    import torch

    # One thread: on a shared two-core machine, two torch threads stall each other
    # whenever another process takes a core (seen: 0.7 s batches turning into 10 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = build_generator(
        settings(llm_backend="local", device="cpu", llm_max_tokens=16, llm_temperature=0)
    )
    assert isinstance(generator, LocalGenerator)
    yield generator
    generator.close()
    torch.set_num_threads(threads)


def test_default_local_model_is_the_smollm2_gguf() -> None:
    path = default_local_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_gguf_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        LocalGenerator("/nonexistent/nope.gguf", device="cpu")


def test_local_batch_equals_one_by_one_when_greedy(local: LocalGenerator) -> None:
    # Lengths medium, long, short: sorting into sub-batches reorders them internally.
    conversations = [
        user("What is object storage?"),
        [{"role": "system", "content": "You are a cloud technology expert. Answer briefly."},
         {"role": "user", "content": "Explain what a load balancer does in a cloud deployment"
                                     " and why one puts it in front of several web servers."}],
        user("Name a color."),
    ]
    batched = local.generate(conversations)
    single = [local.generate([c])[0] for c in conversations]
    assert all(r.error is None and r.text for r in batched)
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert len({r.prompt_tokens for r in batched}) == 3
    # Left padding is masked out and position ids follow the mask, so in fp32 a padded
    # row computes what it computes alone (up to float summation order, which has not
    # flipped a greedy choice for this model and these prompts).
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.completion_tokens and r.completion_tokens <= 16 for r in batched)


def test_local_prompt_too_long_fails_alone(local: LocalGenerator) -> None:
    results = local.generate([user("word " * 9000), user("Say hi.")], max_tokens=4)
    assert results[0].text is None and results[0].error.startswith("prompt too long: ")
    assert results[1].error is None and results[1].text


def test_local_sampling(local: LocalGenerator) -> None:
    [result] = local.generate([user("Tell me about clouds.")], max_tokens=8, temperature=0.8)
    assert result.error is None and result.text and result.model == "SmolLM2-135M-Instruct.Q4_1"
