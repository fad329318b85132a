"""The direction routes: list what is loaded, and load or remove directions while serving.

* ``GET /v1/directions``: every loaded direction (bank slot, requests in flight holding it),
  the default strength and range, and the bank's capacity.
* ``POST /v1/directions`` (admin keys): a ``multipart/form-data`` upload, a ``name`` field and a
  ``file`` field holding a direction artifact (``.safetensors``), as OpenAI's file uploads are
  sent. The artifact is validated exactly as at start-up (format, finite unit rows, the served
  model's hidden size, layer count and weights fingerprint), copied into a free bank slot in
  place, and published: 201 with its card.
* ``DELETE /v1/directions/{name}`` (admin keys): new requests naming it are refused at once;
  requests already admitted with it finish with it, and its slot is reused only after them.

Management needs a key marked ``"admin": true`` in ``--api-keys-file``; without one these two
routes answer 403 saying so. Uploads are bounded by ``--max-direction-bytes`` (413, before a
byte is read) and the bank by ``--max-directions`` (409).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from abliserve.directions.artifact import ArtifactError, DirectionArtifact, load_artifact
from abliserve.projection import site_layer
from abliserve.server.engines.base import Engine
from abliserve.server.engines.direction_slots import DirectionError, check_direction_name
from abliserve.server.errors import ApiError, shown
from abliserve.server.protocol import DirectionCard, DirectionList
from abliserve.server.request_intake import api_state, key_policy

router = APIRouter()

UPLOAD_BODY = {  # documented in /openapi.json; parsed by hand, after the admin check
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "file"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                    "file": {"type": "string", "format": "binary"},
                },
            }
        }
    },
}

UPLOADED = "the uploaded artifact"
ERROR_CODES = {400: "invalid_direction", 404: "direction_not_found", 409: "direction_conflict"}


def direction_card(
    engine: Engine, name: str, artifact: DirectionArtifact, default: bool
) -> DirectionCard:
    """The public description of one loaded direction."""
    slots = engine.direction_slots
    slot = slots.slot(name)
    return DirectionCard(
        name=name,
        default=default,
        model_id=artifact.model.model_id,
        layers=sorted(
            {
                site_layer(i)
                for i, w in enumerate(artifact.weights.tolist())
                if w != 0 and bool(artifact.directions[i].any())
            }
        ),
        method=artifact.method,
        scores=artifact.scores,
        slot=slot,
        in_flight=slots.holders(slot),
    )


def require_admin(request: Request) -> None:
    """403 unless the caller's key may manage directions, saying how to get one."""
    if not key_policy(request).admin:
        raise ApiError(
            403,
            "loading and removing directions needs an admin API key; the operator enables it "
            'by marking a key "admin": true in --api-keys-file',
            code="admin_required",
        )


def direction_error(error: DirectionError | ArtifactError, param: str | None) -> ApiError:
    status = getattr(error, "status", 400)
    return ApiError(status, str(error), param=param, code=ERROR_CODES.get(status))


@router.get("/v1/directions")
async def list_directions(request: Request) -> DirectionList:
    engine: Engine = request.app.state.engine
    policy = api_state(request).policy
    return DirectionList(
        data=[
            direction_card(engine, name, artifact, name == policy.default_direction)
            for name, artifact in engine.directions.items()
        ],
        default_strength=policy.default_strength,
        strength_range=policy.strength_range,
        max_directions=engine.max_directions,
    )


@router.post("/v1/directions", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY})
async def upload_direction(request: Request) -> JSONResponse:
    require_admin(request)
    name, data = await read_upload(request)
    engine: Engine = request.app.state.engine
    try:
        check_direction_name(name)
    except DirectionError as error:
        raise direction_error(error, "name") from None
    try:
        artifact = await asyncio.to_thread(parse_artifact, data)
    except ArtifactError as error:
        raise direction_error(error, "file") from None
    try:
        await engine.add_direction(name, artifact)  # name taken, bank full, another model's
    except (DirectionError, ArtifactError) as error:
        raise direction_error(error, None) from None
    api_state(request).policy.publish(name, float(artifact.weights.max()))
    card = direction_card(engine, name, artifact, default=False)
    return JSONResponse(card.model_dump(), status_code=201)


@router.delete("/v1/directions/{name}")
async def delete_direction(request: Request, name: str) -> dict:
    require_admin(request)
    policy = api_state(request).policy
    engine: Engine = request.app.state.engine
    try:
        slot = engine.direction_slots.slot(name)
    except DirectionError:
        message = f"no direction named {shown(name)} is loaded"
        raise ApiError(404, message, code=ERROR_CODES[404]) from None
    if name == policy.default_direction:
        raise ApiError(
            409,
            f"{name!r} is the server's default direction (the first --direction) and cannot be "
            "removed while the server runs",
            code=ERROR_CODES[409],
        )
    policy.unpublish(name)
    try:
        await engine.remove_direction(name)
    except DirectionError as error:  # removed by a concurrent call meanwhile
        raise direction_error(error, None) from None
    return {
        "id": name,
        "object": "direction",
        "deleted": True,
        "in_flight": engine.direction_slots.holders(slot),
    }


async def read_upload(request: Request) -> tuple[str, bytes]:
    """The ``name`` and ``file`` fields of a multipart upload (400 naming what is missing)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        raise ApiError(
            400,
            "upload a direction as multipart/form-data with fields 'name' and 'file'",
            code="invalid_upload",
        )
    async with request.form(max_files=1, max_fields=4) as form:
        name, upload = form.get("name"), form.get("file")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "the form field 'name' is missing", param="name")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the form field 'file' (the artifact) is missing", param="file")
        return name, await upload.read()


def parse_artifact(data: bytes) -> DirectionArtifact:
    """Validate uploaded bytes with the same reader as ``--direction`` files at start-up."""
    with tempfile.TemporaryDirectory(prefix="abliserve-upload-") as folder:
        path = Path(folder) / "direction.safetensors"
        path.write_bytes(data)
        try:
            return load_artifact(path)
        except ArtifactError as error:
            message = str(error).replace(f"direction artifact {path}", UPLOADED)
            raise ArtifactError(message.replace(str(path), UPLOADED)) from None
