"""OpenAI-compatible request bodies (strictly typed: a string where a number belongs is a 400, not a guess) and
the error body OpenAI clients expect: {"error": {"message", "type", "param", "code"}}.

Every field has a range, checked here before anything reaches the engine (whose thread serves every client, so
nothing a request says may fail there); a value outside it is a 400 naming the field. Integers are bounded so
they fit the engine's tensors, strings where their length costs the engine time. Unknown fields are ignored.

    field                                 range
    messages (chat)                       1 or more; role system | user | assistant (not last); content a string
                                          or [{"type": "text", "text": ...}, {"type": "image_url", "image_url":
                                          {"url": ...}}, ...] (images in user messages, for a VL model: `images`)
    prompt (completions)                  a string, 1+ strings, or 1+ token ids in [0, vocab)
    max_tokens, max_completion_tokens     1 .. 2^31-1, and at most the server's cap and the context left
    n                                     1 .. 128, and n x prompts at most the server's batch (+ queue)
    temperature                           0 .. 2 (0 = greedy)
    top_p                                 (0, 1]
    top_k                                 0 .. 2^31-1 (0 = off)
    min_p                                 0 .. 1
    presence_penalty, frequency_penalty   -2 .. 2
    repetition_penalty                    (0, 10]
    seed                                  -2^63 .. 2^63-1
    stop                                  a string or up to 4 strings, each 1 .. 256 characters
    stream, ignore_eos, routing           booleans; stream_options.include_usage a boolean
    thinking                              a boolean or null
    verify                                0 .. 128 chains, and at most the server's batch
    model                                 any string (a server serves one model)
    moderations: input a string or 1 .. 128 strings
    feedback: rating -1 | 1, choice 0 .. 127, comment up to 4000 characters, completion_id up to 64;
              messages up to 64 turns and response up to 32,000 characters (the turns together too)
    the whole body                        the server's --max-body-bytes (1 MiB by default), else 413; a prompt
                                          longer than the server's --max-prompt-tokens is a 400
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanoseek.data.tokenizer import IMAGE_TOKEN

MAX_SAMPLES = 128  # n, verify (a server's batch is usually smaller and is checked too); feedback choice < this
MAX_INT = 2**31 - 1  # max_tokens, top_k
MAX_STOPS, MAX_STOP_CHARS = 4, 256
FEEDBACK_MAX_MESSAGES, FEEDBACK_MAX_CHARS = 64, 32_000  # a conversation sent with a rating: turns, characters


class ApiError(Exception):
    """An error answered as OpenAI does; status 400 unless told otherwise."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # unknown fields are ignored (clients send vendor extras), known ones must have the right type
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # data:image/...;base64,... (or file://, where the server allows it: `nanoseek.infer.images`)
    detail: Literal["auto", "low", "high"] = "auto"  # accepted as OpenAI's; a VL model has one resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    def text(self) -> str:
        """The content as the chat template reads it: each image part becomes `<image>` and a newline (the turn
        the VL conversations train: `<image>\\nquestion`), at its place among the text parts."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else IMAGE_TOKEN + "\n" for p in self.content)

    def images(self) -> list[tuple[int, str]]:
        """(index in content, URL) of each image part, in order."""
        if isinstance(self.content, str):
            return []
        return [(j, p.image_url.url) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # extensions understood by vLLM-style servers
    top_k: int = Field(default=0, ge=0, le=MAX_INT)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return stops


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    # nanoseek extensions
    thinking: bool | None = None  # True: reason first (R1); False: answer directly (V3); None: model decides
    verify: int = Field(default=0, ge=0, le=MAX_SAMPLES)  # answer with the verification loop over this many chains
    routing: bool = False  # stream the experts each MoE layer chose for every generated token

    @field_validator("messages")
    @classmethod
    def _last_is_not_assistant(cls, v: list[Message]) -> list[Message]:
        if v[-1].role == "assistant":
            raise ValueError("the last message must be from the user or system, not the assistant")
        return v


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v


class FeedbackRequest(_Strict):
    rating: Literal[-1, 1]  # thumbs down / up
    completion_id: str | None = Field(default=None, max_length=64)  # an answer this server gave (preferred)
    choice: int = Field(default=0, ge=0, lt=MAX_SAMPLES)
    # or: the conversation and the answer as the client saw them (stored as unverified: the server cannot
    # vouch that it said them)
    messages: list[Message] | None = Field(default=None, max_length=FEEDBACK_MAX_MESSAGES)
    response: str | None = Field(default=None, max_length=FEEDBACK_MAX_CHARS)
    comment: str = Field(default="", max_length=4000)

    @field_validator("messages")
    @classmethod
    def _bounded(cls, messages: list[Message] | None) -> list[Message] | None:
        size = sum(len(m.text()) for m in messages or [])
        if size > FEEDBACK_MAX_CHARS:
            raise ValueError(f"the messages hold {size} characters; feedback accepts at most {FEEDBACK_MAX_CHARS}")
        return messages


class ModerationRequest(_Strict):
    input: str | list[str]  # OpenAI: a string or an array of strings
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _count(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_SAMPLES:
            raise ValueError(f"give 1 to {MAX_SAMPLES} strings, not {len(value)}")
        return value


class ReloadRequest(_Strict):
    model: str | None = None  # a checkpoint or run directory; None: the path the server was started with


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as `field.path: reason` and the offending top-level parameter."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    branch = next((i for i, p in enumerate(e.get("loc", ())) if _is_branch(p)), None)
    if branch is not None:  # a value that fits no type of a union: the reason of the branch that got furthest
        near = [x for x in errors if tuple(x.get("loc", ()))[:branch] == tuple(e["loc"][:branch])]
        e = max(near, key=lambda x: len(x.get("loc", ())))
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_branch(p)]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    path = ".".join(loc) or "body"
    return f"{path}: {e.get('msg', 'invalid value')}", loc[0] if loc else None


def _is_branch(part) -> bool:
    """A union member's label in a pydantic error location (`str`, `list[...]`, `tagged-union[...]`), which
    names a type tried, not a field of the request."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)
