"""Ablation resolution and API-key policy, without a model."""

from __future__ import annotations

import json

import pytest

from abliserve.errors import UserError
from abliserve.server.engines.base import BASELINE, AblationSpec
from abliserve.server.errors import ApiError
from abliserve.server.policy import (
    FULL_RIGHTS,
    AblationAsk,
    ApiKeys,
    KeyPolicy,
    ServerPolicy,
    applied_json,
    describe_applied,
    load_keys,
    resolve_ablation,
)

SERVER = ServerPolicy(directions=("refusal", "other"), strength_range=(-1.0, 1.0))


def resolve(ask: AblationAsk, server: ServerPolicy = SERVER, key: KeyPolicy = FULL_RIGHTS):
    return resolve_ablation(ask, server, key)


def refused(ask: AblationAsk, server: ServerPolicy = SERVER, key: KeyPolicy = FULL_RIGHTS):
    with pytest.raises(ApiError) as raised:
        resolve(ask, server, key)
    return raised.value


@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        (AblationAsk(), BASELINE),
        (AblationAsk(header_strength="1"), AblationSpec("refusal", 1.0)),
        (AblationAsk(header_strength=" 0.25 "), AblationSpec("refusal", 0.25)),
        (AblationAsk(body_strength=0.5, body_direction="other"), AblationSpec("other", 0.5)),
        (AblationAsk(header_strength="1", header_direction="other"), AblationSpec("other", 1.0)),
        (AblationAsk(header_strength="1", body_strength=1.0), AblationSpec("refusal", 1.0)),
        (AblationAsk(header_strength="-0.5"), AblationSpec("refusal", -0.5)),
        (AblationAsk(header_strength="0", header_direction="other"), BASELINE),
        (AblationAsk(header_direction="other"), BASELINE),
    ],
)
def test_resolution(ask, expected):
    assert resolve(ask) == expected


@pytest.mark.parametrize(
    ("ask", "param", "code"),
    [
        (AblationAsk(header_strength="abc"), "X-Ablation-Strength", "invalid_ablation_strength"),
        (AblationAsk(header_strength=""), "X-Ablation-Strength", "invalid_ablation_strength"),
        (AblationAsk(header_strength="nan"), "X-Ablation-Strength", "invalid_ablation_strength"),
        (AblationAsk(header_strength="-inf"), "X-Ablation-Strength", "invalid_ablation_strength"),
        (AblationAsk(body_strength=float("nan")), "ablation.strength", "invalid_ablation_strength"),
        (AblationAsk(body_strength=float("inf")), "ablation.strength", "invalid_ablation_strength"),
        (AblationAsk(body_strength=1.01), "ablation.strength", "strength_out_of_range"),
        (AblationAsk(header_strength="-2"), "ablation.strength", "strength_out_of_range"),
        (
            AblationAsk(header_strength="1", body_strength=0.5),
            "ablation.strength",
            "ablation_conflict",
        ),
        (
            AblationAsk(header_direction="refusal", body_direction="other"),
            "ablation.direction",
            "ablation_conflict",
        ),
        (AblationAsk(body_direction="nope"), "ablation.direction", "direction_not_found"),
        (
            AblationAsk(header_strength="0", header_direction="nope"),
            "ablation.direction",
            "direction_not_found",
        ),
    ],
)
def test_bad_asks_are_400(ask, param, code):
    error = refused(ask)
    assert (error.status, error.param, error.code) == (400, param, code)


def test_server_default_strength_and_direction():
    server = ServerPolicy(directions=("refusal",), default_strength=0.5)
    assert resolve(AblationAsk(), server) == AblationSpec("refusal", 0.5)
    assert resolve(AblationAsk(header_strength="0"), server) == BASELINE


def test_no_direction_loaded():
    server = ServerPolicy(directions=())
    assert resolve(AblationAsk(), server) == BASELINE
    assert refused(AblationAsk(header_strength="1"), server).code == "direction_not_found"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default_strength": 2.0}, "outside"),
        ({"strength_range": (1.0, 0.0)}, "MIN <= MAX"),
        ({"strength_range": (0.0, float("inf"))}, "finite"),
        ({"directions": (), "default_strength": 0.5}, "no --direction"),
    ],
)
def test_bad_server_policy(kwargs, message):
    with pytest.raises(UserError, match=message):
        ServerPolicy(**{"directions": ("refusal",), **kwargs})


def test_key_without_ablation_rights():
    plain = KeyPolicy(allow_ablation=False)
    assert resolve(AblationAsk(header_strength="0"), key=plain) == BASELINE
    error = refused(AblationAsk(header_strength="0.1"), key=plain)
    assert (error.status, error.code) == (403, "ablation_not_allowed")
    # The operator's default is clipped to the key's rights instead of refused.
    server = ServerPolicy(directions=("refusal",), default_strength=1.0)
    assert resolve(AblationAsk(), server, plain) == BASELINE


def test_capped_key():
    capped = KeyPolicy(max_strength=0.5)
    assert resolve(AblationAsk(header_strength="0.5"), key=capped) == AblationSpec("refusal", 0.5)
    assert refused(AblationAsk(header_strength="0.6"), key=capped).status == 403
    assert refused(AblationAsk(header_strength="-0.6"), key=capped).status == 403
    server = ServerPolicy(directions=("refusal",), default_strength=1.0)
    assert resolve(AblationAsk(), server, capped) == AblationSpec("refusal", 0.5)


def test_applied_reports():
    assert describe_applied(AblationSpec("refusal", 1.0)) == "direction=refusal;strength=1.0"
    assert describe_applied(BASELINE) == "direction=none;strength=0.0"
    assert applied_json(AblationSpec("other", 0.5)) == {"direction": "other", "strength": 0.5}


def test_api_keys_authenticate():
    keys = ApiKeys({"sk-a": FULL_RIGHTS, "sk-b": KeyPolicy(allow_ablation=False)})
    assert keys.authenticate("Bearer sk-a") is FULL_RIGHTS
    assert keys.authenticate("bearer  sk-b ").allow_ablation is False
    for header in (None, "", "Bearer", "Basic sk-a", "Bearer sk-c", "Bearer sk-a2", "sk-a"):
        with pytest.raises(ApiError) as raised:
            keys.authenticate(header)
        assert raised.value.status == 401
        assert "sk-a" not in raised.value.message


def test_no_keys_means_open():
    assert ApiKeys().authenticate(None) is FULL_RIGHTS


def test_load_keys_json_and_toml(tmp_path):
    json_file = tmp_path / "keys.json"
    json_file.write_text(
        json.dumps({"keys": {"sk-1": {"allow_ablation": False}, "sk-2": {"max_strength": 0.5}}})
    )
    keys = load_keys(["sk-0"], json_file)
    assert keys.policies == {
        "sk-0": FULL_RIGHTS,
        "sk-1": KeyPolicy(allow_ablation=False),
        "sk-2": KeyPolicy(max_strength=0.5),
    }
    toml_file = tmp_path / "keys.toml"
    toml_file.write_text('[keys."sk-3"]\nallow_ablation = true\nmax_strength = 1\n')
    assert load_keys([], toml_file).policies == {"sk-3": KeyPolicy(max_strength=1)}


@pytest.mark.parametrize(
    "content",
    [
        '{"keys": []}',
        "[]",
        "{broken",
        '{"keys": {"k": {"allow_ablation": "yes"}}}',
        '{"keys": {"k": {"max_strength": -1}}}',
        '{"keys": {"k": {"root": true}}}',
        '{"keys": {"k": {"admin": "yes"}}}',
        '{"keys": {"k": {"directions": "refusal"}}}',
    ],
)
def test_bad_key_files(tmp_path, content):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(UserError):
        load_keys([], path)


def test_key_file_admin_and_direction_allowlist(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"keys": {"ops": {"admin": true}, "one": {"directions": ["other"]}}}')
    policies = load_keys(["plain"], path).policies
    assert policies["ops"] == KeyPolicy(admin=True)
    assert policies["one"] == KeyPolicy(directions=frozenset({"other"}))
    assert not policies["plain"].admin  # --api-key keys never manage directions


def test_direction_allowlist_refuses_others_and_clips_the_default():
    one = KeyPolicy(directions=frozenset({"other"}))
    assert resolve(AblationAsk(body_direction="other", body_strength=1.0), key=one).active
    error = refused(AblationAsk(body_direction="refusal", body_strength=1.0), key=one)
    assert error.status == 403 and "'refusal'" in error.message
    server = ServerPolicy(directions=("refusal", "other"), default_strength=1.0)
    assert resolve(AblationAsk(), server, one) == BASELINE  # default direction not allowed


def test_directions_published_at_run_time_resolve_and_the_default_stays():
    server = ServerPolicy(directions=("refusal",))
    server.publish("late", peak=2.0)
    spec = resolve(AblationAsk(body_direction="late", body_strength=0.5), server)
    assert spec == AblationSpec("late", 0.5) and server.peak("late") == 2.0
    server.unpublish("late")
    assert refused(AblationAsk(body_direction="late", body_strength=0.5), server).status == 400
    assert server.default_direction == "refusal"
