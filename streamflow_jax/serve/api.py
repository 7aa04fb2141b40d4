"""Request validation and OpenAI's error shape.

Bodies are parsed strictly: JSON without ``NaN``/``Infinity`` tokens, objects checked by
pydantic models that forbid unknown fields (OpenAI's images fields, this server's extensions,
and the three OpenAI fields that mean nothing here and are ignored). Every problem becomes an
``APIError``, answered as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import json
import math
import re
import typing
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse

from streamflow_jax import schedules
from streamflow_jax.sampling import check_seed

# every answer (HTTP and WebSocket) names the replica that made it
REPLICA_HEADER = "x-streamflow-replica"

MAX_N = 10  # images per request (OpenAI's own limit for n)
MAX_STEPS = 100  # steps per request, unless the server is started with another limit
MAX_PROMPT_CHARS = 4000
MAX_JSON_BYTES = 1 << 20
MAX_UPLOAD_BYTES = 32 << 20
IGNORED_FIELDS = ("quality", "style", "user")  # OpenAI's, meaning nothing here: accepted, ignored
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, type=self.type, code=self.code,
                              headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    quality: Any = None
    style: Any = None
    user: Any = None


class GenerationFields(_Fields):
    """``POST /v1/images/generations``."""


class EditFields(_Fields):
    """``POST /v1/images/edits`` (multipart; ``image`` is the file part)."""

    strength: float | None = None


class StreamConfig(BaseModel):
    """The realtime stream's configuration message (``WS /v1/stream``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    strength: float | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def shown(value, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut at ``limit`` characters (a 4000-digit
    number was echoed whole; one past Python's 4300 digits cannot even be printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** limit:
        return f"an integer of more than {limit} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# JSON's names for the types a body decodes to (an error said "got NoneType")
JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array", dict: "an object"}


def parse_json(body: bytes | str, what: str = "the body") -> Any:
    """Strict JSON: UTF-8 (no byte-order mark, no UTF-16), no ``NaN``/``Infinity``; else a 400
    naming ``what`` (the body, or a realtime stream's configuration)."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, f"{what} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"{what} is not valid JSON: {e}") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's own limit on digits, in its words
            raise APIError(400, f"{what} holds a number of more than 4300 digits") from None
        raise APIError(400, f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, f"{what} is not valid JSON: nested too deeply") from None


def validate(model: type[BaseModel], data: Any, *, strict: bool, what: str = "the body"):
    """``data`` checked against ``model`` (JSON: strict types; form fields: see ``form_values``)."""
    if not isinstance(data, dict):
        raise APIError(400, f"{what} must be a JSON object, got {JSON_TYPES.get(type(data), type(data).__name__)}")
    # unknown names first, by a set difference: pydantic makes an error of each one before the
    # first is reported (a million of them held the event loop for seconds)
    unknown = next((k for k in data if k not in model.model_fields), None)
    if unknown is not None:
        known = ", ".join(f for f in model.model_fields if f not in IGNORED_FIELDS)
        raise APIError(400, f"unknown field {shown(unknown)} (this endpoint takes: {known})", param=unknown[:80])
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            raise APIError(400, f"{param} is required", param=param) from None
        raise APIError(400, f"{param}: {err['msg']} (got {shown(err.get('input'))})", param=param) from None


_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def form_values(model: type[BaseModel], fields: dict[str, str]) -> dict[str, Any]:
    """A multipart form's text fields as JSON would give them: integers and decimals written
    plainly (Python's ``int`` took ``"1_0"`` and ``"+3"``, pydantic's lax mode ``"1.0"`` as an
    integer), every other field as its string; refused as the JSON body would be."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        field = model.model_fields.get(name)
        kinds = set(typing.get_args(field.annotation)) if field is not None else set()
        if int in kinds:
            if not _INTEGER.fullmatch(value) or len(value) > 80:
                raise APIError(400, f"{name}: must be an integer written in digits (got {shown(value)})", param=name)
            value = int(value)
        elif float in kinds:
            if not _DECIMAL.fullmatch(value) or len(value) > 80:
                raise APIError(400, f"{name}: must be a decimal number (got {shown(value)})", param=name)
            value = float(value)
            if not math.isfinite(value):
                raise APIError(400, f"{name}: must be a finite number (got {shown(fields[name])})", param=name)
        out[name] = value
    return out


def check_range(name: str, value, low, high) -> None:
    if value is not None and not low <= value <= high:
        raise APIError(400, f"{name} must be in [{low}, {high}], got {shown(value)}", param=name)


def check_common(fields, *, served, max_n: int, max_steps: int) -> dict[str, Any]:
    """The checks every image request shares; returns ``PromptStream.submit``'s arguments (less
    the seed and image) and n."""
    if fields.model is not None and fields.model != served.name:
        raise APIError(404, f"model {fields.model!r} is not served here (this server serves {served.name!r})",
                       param="model", code="model_not_found")
    if fields.response_format == "url":
        raise APIError(400, "response_format 'url' is not supported: this server returns images inline; "
                            "use 'b64_json' (the default)", param="response_format")
    if len(fields.prompt) > MAX_PROMPT_CHARS:
        raise APIError(400, f"prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    check_range("n", fields.n, 1, max_n)
    check_range("steps", fields.steps, 1, min(max_steps, schedules.MAX_STEPS))
    if fields.seed is not None:
        try:
            check_seed(fields.seed)
        except ValueError as e:
            raise APIError(400, str(e), param="seed") from None
    try:
        size = _parse_size(fields.size)
    except ValueError as e:
        raise APIError(400, str(e), param="size") from None
    if size is not None and size != served.size:
        raise APIError(400, f"size {fields.size} cannot be made here: this server makes "
                            f"{served.size[0]}x{served.size[1]} images", param="size")
    for what in ("prompt", "negative_prompt"):
        text = getattr(fields, what)
        if text is not None:
            try:
                served.check_prompt(text, what)
            except ValueError as e:
                raise APIError(400, str(e), param=what) from None
    try:
        guidance = served.stream.pipe.resolve_guidance(fields.guidance_scale)
    except ValueError as e:
        raise APIError(400, str(e), param="guidance_scale") from None
    if np.ndim(guidance.scale):
        raise APIError(400, "guidance_scale must be one number", param="guidance_scale")
    check_negative_prompt(served, fields.negative_prompt, guidance)
    kwargs = {"prompt": fields.prompt, "steps": fields.steps, "guidance_scale": fields.guidance_scale}
    if fields.negative_prompt is not None:
        kwargs["negative_prompt"] = fields.negative_prompt
    return kwargs


def check_negative_prompt(served, negative_prompt, guidance) -> None:
    """A 400 for a negative prompt that the request's guidance would not read (the pipeline's
    ``negative_prompt_problem``: guidance off at its scale, or a model without CFG)."""
    if negative_prompt and (why := served.stream.pipe.negative_prompt_problem(negative_prompt, guidance)) is not None:
        raise APIError(400, why, param="negative_prompt")


def check_strength(strength, served=None, steps: int | None = None) -> None:
    """A 400 for a strength outside (0, 1], or, given ``served``, one that keeps no step of the
    request's grid (``steps``, or the pipeline's default; None: the default strength; the same
    ``schedules.truncate`` the engine applies, so that a realtime configuration is refused, not
    each of its frames, and the error names its parameter)."""
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise APIError(400, f"strength must be in (0, 1], got {shown(strength)}", param="strength")
    if served is not None:
        pipe, latent_shape = served.stream.pipe, served.stream.latent_shape
        try:
            grid = pipe.schedule(schedules.check_steps(pipe.default_steps if steps is None else steps), latent_shape)
            schedules.truncate(grid, schedules.DEFAULT_STRENGTH if strength is None else strength)
        except ValueError as e:
            raise APIError(400, str(e), param="strength") from None


def _parse_size(size):
    from streamflow_jax.serve.models import parse_size

    return parse_size(size)
