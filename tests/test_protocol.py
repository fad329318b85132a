"""Request models and the text stream (UTF-8-safe detokenizing, stop strings), without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from abliserve.server.protocol import ChatCompletionRequest, CompletionRequest
from abliserve.server.textstream import IncrementalDetokenizer, TextAssembler


class ByteTokenizer:
    """Each token id is one byte of UTF-8: decoding a partial character gives U+FFFD."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def token_ids(text: str) -> list[int]:
    return list(text.encode())


def test_chat_request_defaults_and_extensions():
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "ablation": {"strength": 0.5},
            "presence_penalty": 0,
        }
    )
    assert request.messages[0].text() == "hi"
    assert request.ablation.strength == 0.5 and request.ablation.direction is None
    assert request.n == 1 and request.stream is False and request.stop == []


def test_fields_the_engine_cannot_honour_are_refused_not_ignored():
    for extra in ({"user": "u"}, {"tools": []}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            ChatCompletionRequest.model_validate(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
            )


@pytest.mark.parametrize(
    "change",
    [
        {"messages": []},
        {"temperature": -0.1},
        {"top_p": 0},
        {"n": 0},
        {"max_tokens": 0},
        {"top_logprobs": 21},
        {"ablation": {"strength": "strong"}},
        {"ablation": {"strenght": 1}},
        {"ablation": {"direction": ""}},
        {"messages": [{"role": "user", "content": 5}]},
    ],
)
def test_chat_request_rejects(change):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **change}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_stop_strings_normalised():
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "END"}
    )
    assert request.stop == ["END"]


@pytest.mark.parametrize("prompt", ["text", [1, 2, 3], ["a", "b"], [[1], [2, 3]]])
def test_completion_prompt_shapes(prompt):
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt


def test_detokenizer_never_emits_half_a_character():
    text = "naïve 日本語 🙂!"
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = [detokenizer.push([byte]) for byte in token_ids(text)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detokenizer.flush() == text


def test_detokenizer_flushes_an_incomplete_tail():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.push([*token_ids("ok"), 0xE6]) == ""
    assert detokenizer.flush() == "ok\ufffd"


def stream(text: str, stop: list[str]) -> tuple[list[str], bool]:
    assembler = TextAssembler(ByteTokenizer(), stop)
    pieces = []
    for byte in token_ids(text):
        pieces.append(assembler.feed([byte]))
        if assembler.stopped:
            return pieces, True
    pieces.append(assembler.finish())
    return pieces, False


@pytest.mark.parametrize(
    ("text", "stop", "expected", "stopped"),
    [
        ("hello world", [], "hello world", False),
        ("hello world. more", ["."], "hello world", True),
        ("abc END def", ["END", "abc X"], "abc ", True),
        ("no stop here", ["STOP"], "no stop here", False),
        ("日本語です。続き", ["。"], "日本語です", True),
        ("almost EN", ["END"], "almost EN", False),
    ],
)
def test_stop_strings(text, stop, expected, stopped):
    pieces, hit = stream(text, stop)
    assert "".join(pieces) == expected
    assert hit is stopped


def test_partial_stop_string_is_held_back_while_streaming():
    assembler = TextAssembler(ByteTokenizer(), ["STOP"])
    sent = "".join(assembler.feed([b]) for b in token_ids("go ST"))
    assert sent == "go"  # " ST" might begin STOP: held back (len("STOP") - 1 characters)
    assert assembler.feed(token_ids("OP")) == " "
    assert assembler.stopped
    assert assembler.finish() == ""
