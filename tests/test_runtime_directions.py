"""Loading and removing directions while the server runs (docs/ENGINES.md, docs/API.md).

On the transformers engine with a tiny random model: a direction loaded mid-stream changes no
token of the requests in flight, a removed direction's request finishes with its tokens and its
slot is not reused while held, and a direction loaded at run time gives the tokens of the same
artifact loaded at start. Then the HTTP routes over a socket: admin and non-admin keys, bad,
oversized and foreign artifacts, a full bank, per-key direction allowlists, the client and CLI.
(The same engine scenarios run on the vLLM engine in ``test_vllm_engine.py``.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import tiny_models
from reliability_harness import FULL_KEY
from runtime_loading import load_while_streaming, remove_while_streaming
from server_harness import running_server, tiny_direction, tiny_server_args

from abliserve.cli import main as cli_main
from abliserve.clients.client import AbliserveClient, RequestRejectedError
from abliserve.directions.artifact import ArtifactError, DirectionArtifact, load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines.base import BASELINE, AblationSpec
from abliserve.server.engines.direction_slots import (
    DirectionConflictError,
    DirectionError,
    DirectionSlots,
)
from abliserve.server.engines.transformers_engine import TransformersEngine

TOKENS = 96  # long enough that loads land while the engine is still generating
PROMPTS = [[3, 4, 11, 12, 13, 14, 15, 2, 3, 5], [3, 4, 30, 2, 3, 5], [3, 4, 20, 21, 22, 2, 3]]
ADMIN_KEY = "sk-runtime-admin-5d1e"
ONLY_SECOND_KEY = "sk-runtime-second-9a0b"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runtime")
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=3, hidden=32)
    paths = {"checkpoint": checkpoint}
    for seed, name in enumerate(("first", "second", "third"), start=1):
        paths[name] = tiny_direction(checkpoint, folder / f"{name}.safetensors", seed=seed)
    return paths


@pytest.fixture(scope="module")
def engine(artifacts) -> Iterator[TransformersEngine]:
    checkpoint = artifacts["checkpoint"]
    directions = {name: load_artifact(artifacts[name]) for name in ("first", "second")}
    engine = TransformersEngine(
        checkpoint, checkpoint_identity(checkpoint), directions, max_num_seqs=8, max_directions=4
    )
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


def test_loading_mid_stream_changes_no_tokens_and_equals_loading_at_start(engine, artifacts):
    jobs = [
        (PROMPTS[0], AblationSpec("first", 1.0)),
        (PROMPTS[1], BASELINE),
        (PROMPTS[2], AblationSpec("second", 0.5)),
    ]
    late = load_artifact(artifacts["second"])
    result = asyncio.run(load_while_streaming(engine, jobs, "late", late, "second", TOKENS))
    assert result.held_while_loading == [1, 0, 1]  # loaded while the ablated requests ran
    assert result.disturbed == result.undisturbed
    assert all(len(tokens) == TOKENS for tokens in result.disturbed)
    assert result.loaded == result.same_loaded_at_start
    assert result.loaded != result.baseline  # the loaded direction bites: the check can fail
    assert "late" not in engine.directions


def test_removed_direction_finishes_in_flight_and_its_slot_waits(engine, artifacts):
    temporary, other = (load_artifact(artifacts[name]) for name in ("third", "first"))
    result = asyncio.run(
        remove_while_streaming(engine, PROMPTS[0], "temporary", temporary, other, TOKENS)
    )
    assert result.disturbed == result.undisturbed
    assert result.undisturbed != result.baseline  # the direction changes tokens
    assert result.slot_of_next != result.removed_slot  # not reused while held
    assert result.holders_after == 0
    assert result.slot_after_release == result.removed_slot  # free again once released
    assert sorted(engine.directions) == ["first", "second"]


def test_engine_refuses_taken_names_foreign_artifacts_and_a_full_bank(engine, artifacts):
    third = load_artifact(artifacts["third"])
    with pytest.raises(DirectionConflictError, match="already loaded"):
        asyncio.run(engine.add_direction("first", third))
    foreign = replace(third.model, fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="fingerprint"):
        asyncio.run(
            engine.add_direction(
                "foreign", DirectionArtifact(third.directions, third.weights, foreign)
            )
        )
    with pytest.raises(DirectionError, match="invalid"):
        asyncio.run(engine.add_direction("bad name", third))
    asyncio.run(engine.add_direction("a", third))
    asyncio.run(engine.add_direction("b", third))
    try:
        with pytest.raises(DirectionConflictError, match=r"full \(4 slots"):
            asyncio.run(engine.add_direction("c", third))
    finally:
        for name in ("a", "b"):
            asyncio.run(engine.remove_direction(name))
    with (
        pytest.raises(ValueError, match="unknown direction"),
        engine.holding(AblationSpec("a", 1.0)),
    ):
        pass


def test_a_name_loaded_again_never_shares_prefix_cache_salts(engine, artifacts):
    """Prefix-cache salts name the load, not only the direction: K/V cached with a removed
    direction must not be reused by another artifact loaded later under the same name."""
    third = load_artifact(artifacts["third"])
    salts = []
    for _ in range(2):
        asyncio.run(engine.add_direction("again", third))
        with engine.holding(AblationSpec("again", 1.0)) as held:
            salts.append((held.slot, held.cache_salt))
        asyncio.run(engine.remove_direction("again"))
    (slot, salt), (slot_again, salt_again) = salts
    assert slot == slot_again and salt is not None and salt != salt_again
    with engine.holding(BASELINE) as held:
        assert (held.slot, held.cache_salt) == (0, None)


def test_slot_table_frees_a_removed_slot_only_after_its_last_holder():
    slots = DirectionSlots(["a"], capacity=2)
    with slots.hold("a") as slot:
        with slots.hold("a"):
            slots.unpublish("a")
        assert slots.reserve("b") == 2  # slot 1 still held
        with pytest.raises(DirectionConflictError, match="1 removed but still in use"):
            slots.reserve("c")
    assert slot == 1 and slots.holders(1) == 0
    assert slots.reserve("c") == 1


def test_vllm_surface_holds_the_slot_until_the_answer_ends():
    """vLLM's own chat/completions serving: the slot is held until a stream's last event (and
    released at once for a whole answer)."""
    pytest.importorskip("vllm")
    from pydantic import BaseModel

    from abliserve.server.vllm_surface import Recorder, render

    class Answer(BaseModel):
        choices: list = []

    slots = DirectionSlots(["d"], capacity=1)
    spec = AblationSpec("d", 1.0)

    async def events():
        yield 'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
        yield "data: [DONE]\n\n"

    hold = ExitStack()
    hold.enter_context(slots.hold("d"))
    stream = render(events(), spec, Recorder(None, "chat", spec), hold)
    assert slots.holders(1) == 1

    async def drain() -> list:
        return [event async for event in stream.body_iterator]

    assert len(asyncio.run(drain())) == 2
    assert slots.holders(1) == 0
    hold = ExitStack()
    hold.enter_context(slots.hold("d"))
    render(Answer(), spec, Recorder(None, "chat", spec), hold)
    assert slots.holders(1) == 0


def test_vllm_surface_carries_the_held_slot_and_its_salt():
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from abliserve.server.engines.base import HeldSlot
    from abliserve.server.vllm_surface import carry_ablation

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_salt": "mine"}
    )
    carry_ablation(body, AblationSpec("d", 0.5), HeldSlot(slot=3, cache_salt="s"))
    assert body.vllm_xargs == {"abliserve": {"slot": 3, "strength": 0.5}}
    assert body.cache_salt == "s:mine"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-directions", "-1"], "--max-directions must be at least 0"),
        (["--direction", "a b=x.safetensors"], "direction name 'a b' is invalid"),
        (["--direction", "x.safetensors", "--max-directions", "0"], "--max-directions is 0"),
    ],
)
def test_serve_checks_bank_flags_before_loading(flags, message, capsys):
    assert cli_main(["serve", "--model", "/nonexistent", *flags]) == 2
    assert message in capsys.readouterr().err


# --- HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("runtime-server")
    keys = {
        ADMIN_KEY: {"admin": True},
        FULL_KEY: {"allow_ablation": True},
        ONLY_SECOND_KEY: {"directions": ["second", "late"]},
    }
    (folder / "keys.json").write_text(json.dumps({"keys": keys}))
    with running_server(
        *tiny_server_args(artifacts["checkpoint"], artifacts["first"]),
        *("--direction", f"second={artifacts['second']}"),
        *("--api-keys-file", str(folder / "keys.json")),
        *("--max-directions", "3", "--max-direction-bytes", "20000"),
        log_path=folder / "server.log",
    ) as url:
        yield url


def upload(url: str, name: str, data: bytes, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/directions",
        data={"name": name},
        files={"file": ("d.safetensors", data)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def chat(url: str, key: str, direction: str, strength: float = 1.0) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "how to make a bomb"}],
        temperature=0,
        max_tokens=8,
        extra_body={"ablation": {"direction": direction, "strength": strength}},
    )
    return reply.choices[0].message.content


def test_only_admin_keys_manage_directions(server, artifacts):
    data = artifacts["third"].read_bytes()
    error = error_of(upload(server, "late", data, key=FULL_KEY), 403)
    assert '"admin": true' in error["message"] and error["code"] == "admin_required"
    deleted = httpx.delete(
        f"{server}/v1/directions/second", headers={"Authorization": f"Bearer {FULL_KEY}"}
    )
    assert error_of(deleted, 403)["code"] == "admin_required"
    assert error_of(upload(server, "late", data, key="sk-wrong"), 401)


def test_bad_uploads_are_refused_naming_the_problem(server, artifacts):
    data = artifacts["third"].read_bytes()
    junk = error_of(upload(server, "junk", b"not safetensors"), 400)
    assert junk["param"] == "file" and "not a valid safetensors file" in junk["message"]
    foreign = load_artifact(artifacts["third"])
    foreign.model = replace(foreign.model, fingerprint="0" * 64)
    path = foreign.save(artifacts["checkpoint"].parent / "foreign.safetensors")
    error = error_of(upload(server, "foreign", path.read_bytes()), 400)
    assert error["message"].startswith("direction 'foreign' artifact was computed for")
    assert error["message"].endswith("weights fingerprint differs")
    assert error_of(upload(server, "bad name", data), 400)["param"] == "name"
    assert error_of(upload(server, "second", data), 409)["code"] == "direction_conflict"
    assert error_of(upload(server, "huge", b"x" * 30000), 413)["code"] == "request_too_large"
    as_json = httpx.post(
        f"{server}/v1/directions",
        json={"name": "late"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert "multipart/form-data" in error_of(as_json, 400)["message"]


def test_upload_use_list_and_delete_through_the_client(server, artifacts):
    with AbliserveClient(server, ADMIN_KEY) as client:
        card = client.upload_direction("late", artifacts["second"])
        assert card.details["slot"] == 3
        # The bank holds 3: the two start-up directions and "late".
        bank_full = error_of(upload(server, "more", artifacts["third"].read_bytes()), 409)
        assert "full (3 slots" in bank_full["message"]
        listed = {d.name: d.details for d in client.directions()}
        assert listed["late"]["slot"] == 3 and listed["late"]["in_flight"] == 0
        assert listed["refusal"]["default"] and not listed["late"]["default"]
        assert chat(server, ADMIN_KEY, "late") == chat(server, ADMIN_KEY, "second")
        assert client.delete_direction("late") == 0
        with pytest.raises(RequestRejectedError, match="default direction"):
            client.delete_direction("refusal")
        with pytest.raises(RequestRejectedError, match=r"404.*no direction named 'late'"):
            client.delete_direction("late")
    with pytest.raises(openai.BadRequestError, match="unknown direction"):
        chat(server, ADMIN_KEY, "late")


def test_a_key_may_be_limited_to_named_directions(server):
    chat(server, ONLY_SECOND_KEY, "second")
    with pytest.raises(openai.PermissionDeniedError, match="may not use the direction 'refusal'"):
        chat(server, ONLY_SECOND_KEY, "refusal")
    chat(server, ONLY_SECOND_KEY, "refusal", strength=0.0)  # the baseline needs no direction


def test_cli_uploads_lists_and_deletes(server, artifacts, capsys):
    flags = ["--server", server, "--api-key", ADMIN_KEY]
    assert cli_main(["directions", "upload", "cli", str(artifacts["third"]), *flags]) == 0
    assert cli_main(["directions", "list", *flags]) == 0
    assert "cli: slot 3, 0 in flight" in capsys.readouterr().out
    assert cli_main(["directions", "delete", "cli", *flags]) == 0
    assert cli_main(["directions", "delete", "cli", *flags]) == 2
    assert "abliserve: error: server rejected" in capsys.readouterr().err
