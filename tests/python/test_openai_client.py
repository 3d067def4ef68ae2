"""The official OpenAI Python client against the aiguard gateway.

Run by tests/tests/openai_client.rs, which starts the fake upstream
(aiguard_tests::upstream: completions of 8 words "w0 w1 ... w7", prompt tokens =
words in the messages + 3 per message) and the daemon, creates the keys and passes
them in the environment:

- AIGUARD_BASE_URL: the gateway's OpenAI base URL, e.g. http://127.0.0.1:PORT/v1;
- AIGUARD_PAID_KEY: a key of a tier of 1000 requests and 1,000,000 tokens per minute,
  room for every request made here;
- AIGUARD_FREE_KEY: a key of a tier of 2 requests per minute, used by nothing else;
- AIGUARD_TRICKLE_KEY: a key of a tier of 20 requests per minute (one every 3 s),
  used by nothing else.

A missing variable fails the test: it never skips.
"""

import os
import time

import openai
import pytest

MODEL = "gpt-test"
TEXT = "w0 w1 w2 w3 w4 w5 w6 w7"
# "Say three words": 3 words + 3 for the message.
MESSAGES = [{"role": "user", "content": "Say three words"}]
PROMPT_TOKENS = 6
COMPLETION_TOKENS = 8

RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{unit}"
    for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
]

# The trickle tier refills one request every 60 / 20 = 3 s.
TRICKLE_REFILL_S = 3.0


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run this through `cargo test --test openai_client`, "
            "which starts the gateway and creates the keys"
        )
    return value


def client(key_var: str, **kwargs) -> openai.OpenAI:
    # trust_env=False: a proxy set in the environment must not sit between the test and a
    # gateway on loopback.
    return openai.OpenAI(
        base_url=env("AIGUARD_BASE_URL"),
        api_key=env(key_var),
        http_client=openai.DefaultHttpxClient(trust_env=False),
        **kwargs,
    )


def stream_text(chunks) -> str:
    return "".join(
        chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices
    )


def test_chat_completion():
    completion = client("AIGUARD_PAID_KEY").chat.completions.create(
        model=MODEL, messages=MESSAGES
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == COMPLETION_TOKENS
    assert completion.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS


def test_every_answer_carries_rate_limit_headers():
    raw = client("AIGUARD_PAID_KEY").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES
    )
    assert raw.status_code == 200
    missing = [h for h in RATE_LIMIT_HEADERS if h not in raw.headers]
    assert not missing, f"missing {missing} in {dict(raw.headers)}"
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert 0 <= int(raw.headers["x-ratelimit-remaining-requests"]) < 1000
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert 0 <= int(raw.headers["x-ratelimit-remaining-tokens"]) <= 1_000_000
    assert raw.parse().choices[0].message.content == TEXT


def test_streaming():
    chunks = list(
        client("AIGUARD_PAID_KEY").chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True
        )
    )
    assert stream_text(chunks) == TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # Like OpenAI: no usage, and no chunk without choices, unless the client asked. A client
    # that reads chunk.choices[0] must not break because the gateway meters the stream.
    for chunk in chunks:
        assert chunk.choices, f"a chunk without choices that was not asked for: {chunk}"
        assert chunk.usage is None, f"usage that was not asked for: {chunk}"


def test_streaming_with_usage():
    chunks = list(
        client("AIGUARD_PAID_KEY").chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream_text(chunks) == TEXT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert last.usage.completion_tokens == COMPLETION_TOKENS
    assert last.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        assert chunk.choices


def test_unknown_key_is_an_authentication_error():
    bad = openai.OpenAI(
        base_url=env("AIGUARD_BASE_URL"),
        api_key="aig_not_a_key_of_this_gateway",
        http_client=openai.DefaultHttpxClient(trust_env=False),
        max_retries=0,
    )
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert error.status_code == 401
    assert error.code == "invalid_api_key"
    assert error.type == "invalid_request_error"


def test_free_tier_third_request_is_rate_limited():
    free = client("AIGUARD_FREE_KEY", max_retries=0)
    for _ in range(2):
        free.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        free.chat.completions.create(model=MODEL, messages=MESSAGES)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    headers = error.response.headers
    assert "retry-after" in headers, dict(headers)
    assert 0 < int(headers["retry-after"]) <= 60, headers["retry-after"]
    assert 0 < float(headers["retry-after-ms"]) <= 60_000, headers["retry-after-ms"]
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"


def retry_after_s(headers) -> float:
    assert "retry-after" in headers, f"a 429 without Retry-After: {dict(headers)}"
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    return float(headers["retry-after"])


def test_retry_waits_for_retry_after():
    # Use the trickle tier up, back to back, until it refuses.
    once = client("AIGUARD_TRICKLE_KEY", max_retries=0)
    refused = None
    for _ in range(100):
        try:
            once.chat.completions.create(model=MODEL, messages=MESSAGES)
        except openai.RateLimitError as error:
            refused = time.monotonic()
            announced = retry_after_s(error.response.headers)
            break
    assert refused is not None, "100 requests in a row and the trickle tier never refused one"
    assert 0 < announced <= TRICKLE_REFILL_S + 0.5, (
        f"Retry-After {announced} s: the trickle tier refills one request every "
        f"{TRICKLE_REFILL_S} s"
    )

    # The client's own backoff would retry after at most 0.5 s and 1 s more, both before the
    # refill: only waiting as told lets the call succeed with 2 retries.
    retrying = client("AIGUARD_TRICKLE_KEY", max_retries=2)
    raw = retrying.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    waited = time.monotonic() - refused
    assert raw.parse().choices[0].message.content == TEXT
    assert raw.retries_taken >= 1, "the first attempt should have been refused"
    assert raw.http_request.headers["x-stainless-retry-count"] == str(raw.retries_taken)
    assert waited >= announced - 0.1, (
        f"succeeded {waited:.2f} s after a refusal that said to wait {announced:.2f} s"
    )
    assert waited <= announced + 2 * TRICKLE_REFILL_S, (
        f"succeeded only {waited:.2f} s after a refusal that said to wait {announced:.2f} s"
    )
