"""No request field is accepted and ignored by the transformers engine's API.

The test walks the request schema: every field of OpenAI's chat and completions requests (the
``openai`` SDK's own parameter types), of vLLM's (where vLLM is installed) and of abliserve's
request models. A field abliserve's models name must have a probe below showing the answer
changes as the field says; any other field must be a 400 naming it. Adding a field to the
models without a probe fails here, so nothing can slip in unhonoured.

On the vLLM engine the same holds by construction (vLLM's own request models and serving, plus a
400 for fields they do not name); ``test_vllm_surface.py`` checks it against ``vllm serve``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from server_harness import tiny_served

from abliserve.server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "how to make a bomb"}]
EOS = 2  # the tiny tokenizer's <|end|>
FORCED, FORCED_TEXT = 7, "I"  # an ordinary word of the tiny vocabulary
BASE = {"temperature": 0, "max_tokens": 6, "return_token_ids": True, "ignore_eos": True}
RANDOM = {"temperature": 1.0, "seed": 11}

Check = Callable[[dict, dict], bool]


def tokens(answer: dict) -> list[list[int] | None]:
    return [choice.get("token_ids") for choice in answer["choices"]]


def differs(answer: dict, base: dict) -> bool:
    return tokens(answer) != tokens(base)


def same(answer: dict, base: dict) -> bool:
    return tokens(answer) == tokens(base)


def text(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def finish(answer: dict) -> str:
    return answer["choices"][0]["finish_reason"]


def probe(extra: dict, check: Check, base: dict | None = None) -> tuple[dict, dict, Check]:
    """A request with ``extra`` (over the greedy base request, or over ``base``) whose answer
    passes ``check(answer, answer to the base)``."""
    return extra, base or {}, check


FORCE = {"logit_bias": {str(FORCED): 100}}
FORCE_EOS = {"ignore_eos": False, "logit_bias": {str(EOS): 100}}
CHAT_PROBES: dict[str, tuple[dict, dict, Check]] = {
    "model": probe({"model": "other"}, lambda a, b: a["error"]["param"] == "model"),
    "messages": probe(
        {"messages": [{"role": "user", "content": "tell me a story"}]},
        lambda a, b: a["usage"]["prompt_tokens"] != b["usage"]["prompt_tokens"],
    ),
    "max_tokens": probe({"max_tokens": 3}, lambda a, b: len(tokens(a)[0]) == 3),
    "max_completion_tokens": probe(
        {"max_tokens": None, "max_completion_tokens": 2}, lambda a, b: len(tokens(a)[0]) == 2
    ),
    "temperature": probe(RANDOM, differs),
    "seed": probe({**RANDOM, "seed": 12}, differs, base=RANDOM),
    "top_p": probe({**RANDOM, "top_p": 1e-9}, same),  # narrowed to one token: greedy again
    "top_k": probe({**RANDOM, "top_k": 1}, same),
    "min_p": probe({**RANDOM, "min_p": 1.0}, same),
    "n": probe({"n": 2}, lambda a, b: len(a["choices"]) == 2),
    "stop": probe(
        {"stop": [FORCED_TEXT]},
        lambda a, b: finish(a) == "stop" and text(a) == "",
        base=FORCE,
    ),
    "stream": probe({"stream": True}, lambda a, b: a["streamed"] and a["tokens"] == tokens(b)[0]),
    "stream_options": probe(
        {"stream": True, "stream_options": {"include_usage": True}},
        lambda a, b: a["usage"]["completion_tokens"] == 6,
    ),
    "logprobs": probe(
        {"logprobs": True}, lambda a, b: len(a["choices"][0]["logprobs"]["content"]) == 6
    ),
    "top_logprobs": probe(
        {"logprobs": True, "top_logprobs": 3},
        lambda a, b: all(
            len(t["top_logprobs"]) == 3 for t in a["choices"][0]["logprobs"]["content"]
        ),
    ),
    "ablation": probe({"ablation": {"strength": 1}}, lambda a, b: a["ablation"]["strength"] == 1),
    "return_token_ids": probe({"return_token_ids": False}, lambda a, b: tokens(a) == [None]),
    "ignore_eos": probe(
        {"ignore_eos": False},
        lambda a, b: finish(a) == "stop" and tokens(a) == [[]],
        base={**FORCE_EOS, "ignore_eos": True},
    ),
    "logit_bias": probe(FORCE, lambda a, b: tokens(a) == [[FORCED] * 6]),
    "min_tokens": probe(
        {"min_tokens": 3},
        lambda a, b: len(tokens(a)[0]) == 3 and finish(a) == "stop",
        base=FORCE_EOS,
    ),
    "stop_token_ids": probe(
        {"stop_token_ids": [FORCED]},
        lambda a, b: tokens(a) == [[]] and finish(a) == "stop",
        base=FORCE,
    ),
    "presence_penalty": probe({"presence_penalty": 2.0}, differs),
    "frequency_penalty": probe({"frequency_penalty": 2.0}, differs),
    "repetition_penalty": probe({"repetition_penalty": 10.0}, differs),
}
# Completions share the sampling fields; these are its own.
COMPLETION_PROBES: dict[str, tuple[dict, dict, Check]] = {
    "prompt": probe({"prompt": "tell me a story"}, differs),
    "logprobs": probe(
        {"logprobs": 2}, lambda a, b: len(a["choices"][0]["logprobs"]["tokens"]) == 6
    ),
    "echo": probe({"echo": True}, lambda a, b: a["error"]["param"] == "echo"),  # refused by name
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("surface")
    with tiny_served(folder, "--log-level", "warning") as served:
        yield served.url


def post(url: str, path: str, body: dict) -> dict:
    """The JSON answer, or for a stream the token ids and usage it carried."""
    body = {k: v for k, v in body.items() if v is not None}
    if not body.get("stream"):
        return httpx.post(f"{url}{path}", json=body, timeout=120).json()
    answer: dict[str, Any] = {"streamed": True, "tokens": [], "usage": None}
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                answer["usage"] = chunk.get("usage") or answer["usage"]
                for choice in chunk["choices"]:
                    answer["tokens"] += choice.get("token_ids") or []
    return answer


def ask(url: str, endpoint: str, extra: dict) -> dict:
    if endpoint == "chat":
        request = {"model": MODEL, "messages": MESSAGES, **BASE, **extra}
        return post(url, "/v1/chat/completions", request)
    return post(url, "/v1/completions", {"model": MODEL, "prompt": "how to", **BASE, **extra})


def schema_fields(*sources: Any) -> set[str]:
    names: set[str] = set()
    for source in sources:
        names |= set(getattr(source, "model_fields", None) or source.__annotations__)
    return names


def vllm_fields(module: str, name: str) -> set[str]:
    """The fields of one of vLLM's request models (none where vLLM is not installed)."""
    try:
        return set(getattr(importlib.import_module(module), name).model_fields)
    except ImportError:
        return set()


CHAT_FIELDS = schema_fields(chat_create_params.CompletionCreateParamsBase, ChatCompletionRequest)
CHAT_FIELDS |= vllm_fields(
    "vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"
)
COMPLETION_FIELDS = schema_fields(
    completion_create_params.CompletionCreateParamsBase, CompletionRequest
) | vllm_fields("vllm.entrypoints.openai.completion.protocol", "CompletionRequest")


def test_every_model_field_has_a_probe() -> None:
    assert set(ChatCompletionRequest.model_fields) == set(CHAT_PROBES)
    assert set(CompletionRequest.model_fields) <= set(CHAT_PROBES) | set(COMPLETION_PROBES)


def check_field(url: str, endpoint: str, field: str, probes: dict) -> None:
    if field in probes:
        extra, base, check = probes[field]
        assert check(ask(url, endpoint, {**base, **extra}), ask(url, endpoint, base)), field
    else:
        answer = ask(url, endpoint, {field: 1})
        assert answer["error"]["param"] == field, answer


@pytest.mark.parametrize("field", sorted(CHAT_FIELDS))
def test_chat_field_is_honoured_or_refused(server: str, field: str) -> None:
    check_field(server, "chat", field, CHAT_PROBES)


@pytest.mark.parametrize("field", sorted(COMPLETION_FIELDS))
def test_completion_field_is_honoured_or_refused(server: str, field: str) -> None:
    probes = {**CHAT_PROBES, **COMPLETION_PROBES}
    probes.pop("messages")
    probes.pop("max_completion_tokens")
    check_field(server, "completions", field, probes)


def test_sampling_controls_follow_vllms_formulas() -> None:
    """The processing order and formulas of vLLM's sampler, on hand-made logits."""
    import torch

    from abliserve.server.engines.base import SamplingOptions
    from abliserve.server.engines.sampling import processed_logits

    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    options = SamplingOptions(
        max_tokens=4,
        logit_bias={3: 1.0},
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        min_tokens=2,
    )
    out = processed_logits(logits, options, prompt_ids=[0], output_ids=[1, 1], stop_ids=frozenset())
    # token 0 (in prompt): 2/2; token 1 (twice in output): -1*2 - 2*0.5 - 0.25; token 3: bias
    assert out.tolist() == [1.0, -3.25, 0.5, 1.0]
    masked = processed_logits(
        logits, SamplingOptions(max_tokens=4, min_tokens=2), [0], [1], frozenset({2})
    )
    assert masked[2] == -float("inf") and masked[0] == 2.0
    assert logits.tolist() == [2.0, -1.0, 0.5, 0.0]  # the raw logits stay for logprobs


def test_a_penalty_near_zero_leaves_the_row_sampleable() -> None:
    """repetition_penalty just above 0 (the field's bound) sends penalised positive logits to
    +inf; the row must still sample (among those tokens), never fail with a NaN tensor."""
    import torch

    from abliserve.server.engines.base import SamplingOptions
    from abliserve.server.engines.sampling import processed_logits, sample_token

    options = SamplingOptions(max_tokens=4, repetition_penalty=1e-300, temperature=1.0, seed=0)
    logits = processed_logits(torch.tensor([2.0, -1.0, 0.5, 3.0]), options, [0], [3], frozenset())
    assert torch.isposinf(logits[[0, 3]]).all()
    drawn = {sample_token(logits, options, torch.Generator().manual_seed(s)) for s in range(16)}
    assert drawn == {0, 3}


def test_unknown_field_message_names_it(server: str) -> None:
    answer = ask(server, "chat", {"tools": [{"type": "function", "function": {"name": "f"}}]})
    assert answer["error"]["param"] == "tools"
    assert "not supported" in answer["error"]["message"]


def test_unknown_tool_call_parser_is_a_user_error() -> None:
    """``--tool-call-parser`` is checked against vLLM's parsers before any model loads."""
    pytest.importorskip("vllm")
    from abliserve.errors import UserError
    from abliserve.server.cli import check_tool_call_parser

    check_tool_call_parser("hermes")
    with pytest.raises(UserError, match="not one of vLLM's"):
        check_tool_call_parser("no-such-parser")
