"""Request bodies in ``/openapi.json``.

The generation routes parse their bodies by hand (so malformed input is an OpenAI-shaped 400
naming the field, not FastAPI's 422), which hides their request models from FastAPI's schema.
:func:`document_request_bodies` puts them back, so clients, code generators and the fuzzer
(``tests/test_fuzz.py``, schemathesis) see the real shapes.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from abliserve.server.ab_protocol import ABRequest, FirstTokenRequest
from abliserve.server.protocol import ChatCompletionRequest, CompletionRequest

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/ab": ABRequest,
    "/v1/ab/first-token": FirstTokenRequest,
}
REF = "#/components/schemas/{model}"


def document_request_bodies(app: FastAPI, model_names: list[str]) -> None:
    """Make ``app.openapi()`` include each route's JSON request body (routes not served are
    skipped), with ``model`` restricted to the names this server serves."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in REQUEST_BODIES.items():
                operation = schema["paths"].get(path, {}).get("post")
                if operation is None:
                    continue
                body = model.model_json_schema(ref_template=REF)
                components.update(body.pop("$defs", {}))
                if "model" in body["properties"]:
                    optional = "model" not in body.get("required", [])
                    names = [*model_names, None] if optional else list(model_names)
                    body["properties"]["model"] = {"title": "Model", "enum": names}
                components[model.__name__] = body
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
                    },
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
