"""Who may ablate how much: resolving one request's (direction, strength) and checking its key.

A request says what it wants in a header pair (``X-Ablation-Strength``, ``X-Ablation-Direction``)
or in the body (``"ablation": {"strength": .., "direction": ..}``, the OpenAI SDK's
``extra_body``). Both may be present only if they agree. What is not said comes from the
server's defaults: the operator's default strength (0 unless set) and the first loaded direction.

API keys are optional. Each key carries a policy: whether it may ablate at all, up to what
strength, with which directions (an allowlist), and whether it may load and remove directions
(``admin``). An explicit request beyond its rights is refused (403); the server default is
clipped to the key's rights instead, so a key without ablation rights simply gets the baseline
model. Keys are compared in constant time and never appear in messages or logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from abliserve.errors import UserError
from abliserve.server.engines.base import BASELINE, AblationSpec
from abliserve.server.errors import ApiError, bad_request, shown

STRENGTH_HEADER = "X-Ablation-Strength"
DIRECTION_HEADER = "X-Ablation-Direction"
APPLIED_HEADER = "X-Ablation-Applied"


@dataclass(frozen=True)
class KeyPolicy:
    """What one API key may do. ``max_strength`` caps the EFFECTIVE strength |strength| x peak,
    where peak is the largest site weight of the direction used (an artifact's weights scale
    the strength per site, so capping the strength alone would not cap what is removed);
    None = the server's range."""

    allow_ablation: bool = True
    max_strength: float | None = None
    directions: frozenset[str] | None = None  # the directions this key may use; None: any
    admin: bool = False  # may load and remove directions (POST/DELETE /v1/directions)

    def may_use(self, direction: str | None) -> bool:
        return direction is None or self.directions is None or direction in self.directions

    def permits(self, strength: float, peak: float = 1.0) -> bool:
        if strength == 0:
            return True
        if not self.allow_ablation:
            return False
        return self.max_strength is None or abs(strength) * peak <= self.max_strength

    def clip(self, strength: float, peak: float = 1.0) -> float:
        """The server default as this key may receive it."""
        if not self.allow_ablation:
            return 0.0
        if self.max_strength is None or peak == 0:
            return strength
        limit = self.max_strength / peak
        return max(-limit, min(limit, strength))


FULL_RIGHTS = KeyPolicy()


@dataclass
class ServerPolicy:
    """The operator's ablation settings (``--default-strength``, ``--strength-range``) and the
    directions requests may name; directions loaded or removed while the server runs are
    published here (:meth:`publish`, :meth:`unpublish`)."""

    directions: tuple[str, ...]  # loaded direction names; the first at start is the default
    default_strength: float = 0.0
    strength_range: tuple[float, float] = (0.0, 1.0)
    peaks: Mapping[str, float] = field(default_factory=dict)  # largest site weight (default 1)
    default_direction: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.default_direction = self.directions[0] if self.directions else None
        low, high = self.strength_range
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise UserError(
                f"--strength-range must be two finite numbers MIN <= MAX, got {low},{high}"
            )
        if not (math.isfinite(self.default_strength) and low <= self.default_strength <= high):
            raise UserError(
                f"--default-strength {self.default_strength} lies outside --strength-range "
                f"{low},{high}"
            )
        if self.default_strength != 0 and not self.directions:
            raise UserError("--default-strength is non-zero but no --direction is loaded")

    def publish(self, name: str, peak: float) -> None:
        """A direction loaded at run time: requests may name it from now on."""
        self.directions = (*self.directions, name)
        self.peaks = {**self.peaks, name: peak}

    def unpublish(self, name: str) -> None:
        """A direction removed at run time: requests naming it are refused from now on (the
        default direction cannot be removed; the caller checks)."""
        self.directions = tuple(known for known in self.directions if known != name)
        self.peaks = {known: peak for known, peak in self.peaks.items() if known != name}

    def peak(self, direction: str | None) -> float:
        """The factor from a strength to the effective strength of ``direction``."""
        return self.peaks.get(direction, 1.0) if direction is not None else 1.0


@dataclass(frozen=True)
class AblationAsk:
    """What a request asked for, before defaults: raw header strings and body values."""

    header_strength: str | None = None
    header_direction: str | None = None
    body_strength: float | None = None
    body_direction: str | None = None


def parse_strength(text: str, param: str) -> float:
    """A strength from a header: a finite decimal number (the value is not echoed back)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise bad_request(f"{param} must be a number", param, "invalid_ablation_strength") from None
    return check_finite(value, param)


def check_finite(value: float, param: str) -> float:
    if not math.isfinite(value):
        raise bad_request(
            f"{param} must be a finite number, got {value}", param, "invalid_ablation_strength"
        )
    return float(value)


def _agree(header: object, body: object, what: str) -> object:
    if header is not None and body is not None and header != body:
        raise bad_request(
            f"the {what} in the header and in the body disagree",
            f"ablation.{what}",
            "ablation_conflict",
        )
    return header if header is not None else body


def resolve_ablation(ask: AblationAsk, server: ServerPolicy, key: KeyPolicy) -> AblationSpec:
    """The ablation to apply to one request, or an :class:`ApiError` (400 bad, 403 forbidden)."""
    header_strength = (
        parse_strength(ask.header_strength, STRENGTH_HEADER)
        if ask.header_strength is not None
        else None
    )
    body_strength = (
        check_finite(ask.body_strength, "ablation.strength")
        if ask.body_strength is not None
        else None
    )
    header_direction = ask.header_direction.strip() if ask.header_direction is not None else None
    strength = _agree(header_strength, body_strength, "strength")
    direction = _agree(header_direction, ask.body_direction, "direction")

    if direction is not None and direction not in server.directions:
        known = ", ".join(server.directions) or "none loaded"
        quoted = f" {shown(direction)}" if ask.body_direction is not None else ""  # not a header
        raise bad_request(
            f"unknown direction{quoted} (known: {known})",
            "ablation.direction",
            "direction_not_found",
        )
    direction = direction or server.default_direction
    peak = server.peak(direction)
    if strength is None:
        # The server default as this key may receive it: none of a direction it may not use.
        strength = key.clip(server.default_strength, peak) if key.may_use(direction) else 0.0
    else:
        low, high = server.strength_range
        if not low <= strength <= high:
            raise bad_request(
                f"ablation strength {strength} is outside the accepted range [{low}, {high}]",
                "ablation.strength",
                "strength_out_of_range",
            )
        if not key.permits(strength, peak):
            reason = (
                "this API key may not use ablation"
                if not key.allow_ablation
                else f"this API key may use effective strengths up to {key.max_strength} "
                f"(strength x the direction's largest site weight, here {peak:g})"
            )
            raise ApiError(
                403,
                f"{reason} (asked for {strength})",
                param="ablation.strength",
                code="ablation_not_allowed",
            )
        if strength != 0 and not key.may_use(direction):
            raise ApiError(
                403,
                f"this API key may not use the direction {shown(str(direction))}",
                param="ablation.direction",
                code="direction_not_allowed",
            )
    if strength == 0:
        return BASELINE
    if direction is None:
        raise bad_request(
            "ablation was requested but the server has no direction loaded (start it with "
            "--direction)",
            "ablation.direction",
            "direction_not_found",
        )
    return AblationSpec(direction=direction, strength=float(strength))


def describe_applied(spec: AblationSpec) -> str:
    """The ``X-Ablation-Applied`` header value, e.g. ``direction=refusal;strength=1.0``."""
    return f"direction={spec.direction or 'none'};strength={spec.strength}"


def applied_json(spec: AblationSpec) -> dict:
    """The ``ablation`` field of responses."""
    return {"direction": spec.direction, "strength": spec.strength}


@dataclass
class ApiKeys:
    """The accepted keys and their policies; empty means authentication is off."""

    policies: dict[str, KeyPolicy] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.policies)

    def authenticate(self, authorization: str | None) -> KeyPolicy:
        """The policy of the key in an ``Authorization: Bearer`` header, or 401."""
        if not self.enabled:
            return FULL_RIGHTS
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        # Compare digests of every key (equal lengths, no early exit): timing reveals nothing.
        offered = hashlib.sha256(token.encode()).digest()
        found: KeyPolicy | None = None
        for key, policy in self.policies.items():
            if hmac.compare_digest(offered, hashlib.sha256(key.encode()).digest()):
                found = policy
        if found is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return found

    def redact(self, text: str) -> str:
        """``text`` with every configured key replaced: no message may carry a credential."""
        for key in self.policies:
            text = text.replace(key, "[redacted]")
        return text


def check_key_text(key: str, where: str) -> None:
    """Keys are printable ASCII without spaces: HTTP headers arrive as latin-1, so a key with
    other characters could never match (and spaces break ``Bearer <key>``)."""
    if not (key.isascii() and key.isprintable() and " " not in key):
        raise UserError(f"{where} must be printable ASCII without spaces (the key is not shown)")


KEY_FIELDS = ("allow_ablation", "max_strength", "directions", "admin")


def key_policy(entry: object, where: str) -> KeyPolicy:
    """One keys-file entry as a :class:`KeyPolicy`, every field checked."""
    if not isinstance(entry, dict) or set(entry) - set(KEY_FIELDS):
        raise UserError(f"{where} must be a table with only {', '.join(KEY_FIELDS)}")
    allow = entry.get("allow_ablation", True)
    cap = entry.get("max_strength")
    admin = entry.get("admin", False)
    directions = entry.get("directions")
    if not isinstance(allow, bool) or not (
        cap is None or (isinstance(cap, int | float) and math.isfinite(cap) and cap >= 0)
    ):
        raise UserError(f"{where} needs allow_ablation true/false and max_strength a number >= 0")
    if not isinstance(admin, bool):
        raise UserError(f"{where}: admin must be true or false")
    if directions is not None and not (
        isinstance(directions, list) and all(isinstance(name, str) for name in directions)
    ):
        raise UserError(f"{where}: directions must be a list of direction names")
    return KeyPolicy(
        allow_ablation=allow,
        max_strength=cap,
        directions=None if directions is None else frozenset(directions),
        admin=admin,
    )


def load_keys(plain_keys: list[str], keys_file: Path | None) -> ApiKeys:
    """Keys from ``--api-key`` (full rights, not admin) and ``--api-keys-file`` (JSON or TOML)::

    {"keys": {"sk-ops": {"allow_ablation": true, "admin": true},
              "sk-capped": {"allow_ablation": true, "max_strength": 0.5},
              "sk-one": {"directions": ["refusal"]},
              "sk-plain": {"allow_ablation": false}}}
    """
    for number, key in enumerate(plain_keys, start=1):
        check_key_text(key, f"--api-key number {number}")
    policies = {key: FULL_RIGHTS for key in plain_keys if key}
    if keys_file is None:
        return ApiKeys(policies)
    try:
        text = keys_file.read_text()
        if keys_file.suffix == ".toml":
            import tomllib  # Python 3.11+; JSON key files work everywhere

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError, ImportError) as error:
        raise UserError(f"cannot read --api-keys-file {keys_file}: {error}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"--api-keys-file {keys_file} needs a 'keys' table mapping key -> policy")
    for number, (key, entry) in enumerate(entries.items(), start=1):
        check_key_text(str(key), f"--api-keys-file {keys_file}: key {number}")
        policies[str(key)] = key_policy(entry, f"--api-keys-file {keys_file}: entry {number}")
    return ApiKeys(policies)
