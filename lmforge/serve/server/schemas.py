"""The request bodies of the OpenAI API this server speaks (pydantic), and turning a body into
one of them with a 400 that names the field at fault."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from lmforge.serve.server.errors import bad_request

# OpenAI parameters this server does not implement: refused by name rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "tool_choice",
               "functions", "function_call", "response_format")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The parameters both endpoints share. `top_k` (as in vLLM), `deadline_s` (the longest the
    request may take; past it the request is dropped and answered 504) and `early_exit_threshold`
    (adaptive depth: a token leaves at the first early exit whose confidence reaches it; >= 1 never;
    None: the server's --early-exit-threshold) extend OpenAI's set."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: StrictInt | None = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    deadline_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    early_exit_threshold: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported by this server (only 0)")
        return v

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # the validator made it a list


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class FeedbackRequest(BaseModel):
    """A rating of one choice (-1 down, +1 up) or, for a completion with several choices, the
    preferred one; kept as preference data for fine-tuning."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    rating: Literal[-1, 1] | None = None
    choice: StrictInt = Field(default=0, ge=0)
    preferred_choice: StrictInt | None = Field(default=None, ge=0)
    comment: str | None = Field(default=None, max_length=2000)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: object) -> bool:
    """pydantic names the union branch it tried in an error's location (`str`, `list[str]`, ...)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[-")
                                      or part.startswith("literal"))


def _field_name(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) if loc else "body"


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """`body` (JSON bytes) as `model`, or a 400 in OpenAI's shape whose `param` names the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON ({e.__class__.__name__}: {e})", None) from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", None)
    for name in UNSUPPORTED:
        if name in data and data[name] not in (None, False, 0):
            raise bad_request(f"'{name}' is not supported by this server", name)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not _is_type_tag(p))
        name = _field_name(loc)
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unrecognized request argument: {name}", name) from None
        if err["type"] == "missing":
            raise bad_request(f"missing required argument: {name}", name) from None
        raise bad_request(f"invalid value for '{name}': {err['msg']}", name) from None
