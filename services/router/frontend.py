"""What the router does before any instance is involved: tokenize and validate a request.

Every problem a client can fix is an InvalidRequestError whose message says what is wrong (it
becomes INVALID_ARGUMENT): empty prompt, unknown model, prompt too long, bad sampling values,
malformed token ids, bad chat messages or stop strings.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from common.config import ModelConfig
from common.errors import InvalidRequestError
from common.metadata.types import check_id
from common.model.tokenizer import Tokenizer
from common.sampling_params import SamplingParams, check_top_logprobs

CHAT_ROLES = ("system", "user", "assistant")
MAX_ECHO_CHARS = 64            # of a client's value quoted back in an error (gRPC metadata has a size limit)


def _short(value: str) -> str:
    """`value` as quoted in an error: repr, cut to MAX_ECHO_CHARS characters."""
    return repr(value) if len(value) <= MAX_ECHO_CHARS else repr(value[:MAX_ECHO_CHARS]) + f"... ({len(value)} chars)"

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class PromptInput:
    """A request as the client sent it (proto-free). Exactly one of text / token_ids / messages
    (chat turns: [{"role": "system" | "user" | "assistant", "content": str}, ...])."""
    request_id: str = ""
    text: str | None = None
    token_ids: list[int] | None = None
    chat: bool = False
    model: str = ""
    sampling: dict = field(default_factory=dict)    # SamplingParams fields the client set
    return_logprobs: bool = False
    ttft_slo_s: float | None = None                 # the request's own SLO (None = the default)
    tbt_slo_s: float | None = None
    messages: list[dict] | None = None
    stop: tuple[str, ...] = ()                      # stop strings
    top_logprobs: int = 0                           # most likely tokens per position (0..20; implies logprobs)
    ignore_eos: bool = False                        # do not stop at the model's EOS ids


@dataclass(frozen=True)
class Job:
    """A validated request: what the instances are asked to do."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams                          # stop_token_ids include the model's EOS ids unless
                                                    # params.ignore_eos
    return_logprobs: bool
    ttft_slo_s: float | None = None                 # the request's own SLO (None = the default)
    tbt_slo_s: float | None = None
    stop: tuple[str, ...] = ()                      # stop strings (the router ends the request at one)
    top_logprobs: int = 0                           # sent to the instances beside params (not in them)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


class Frontend:
    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, name: str, source: str,
                 max_model_len: int, max_prompt_tokens: int, default_max_tokens: int) -> None:
        self.tokenizer = tokenizer
        from common.model.loader import served_model_name   # (torch: loaded with the checkpoint already)
        self.name = name or served_model_name(source)
        self.vocab_size = config.vocab_size
        self.max_model_len = max_model_len
        self.max_prompt_tokens = min(max_prompt_tokens or max_model_len - 1, max_model_len - 1)
        self.default_max_tokens = default_max_tokens
        self.eos_ids = tuple(dict.fromkeys((*config.eos_token_ids, *tokenizer.eos_token_ids)))
        self.info = ModelInfo(self.name, max_model_len, config.vocab_size, self.eos_ids, config.bos_token_id)
        # No token covers more input bytes than its own text has (byte-level BPE: one character per
        # byte; SentencePiece's U+2581 is 3 bytes for a 1-byte space), so a text longer than this many
        # bytes has too many tokens for sure: refused before tokenizing it (a 4 MB prompt took seconds).
        vocab = getattr(getattr(tokenizer, "hf", None), "get_vocab", dict)()
        longest = max((len(t.encode()) for t in vocab), default=64)      # 64: a tokenizer without a vocab
        self.max_text_bytes = self.max_prompt_tokens * max(longest, 1) + 4096

    def prepare(self, req: PromptInput) -> Job:
        """Tokenizes (chat template when asked) and validates; raises InvalidRequestError."""
        rid = req.request_id or f"req-{uuid.uuid4().hex}"
        check_id("request_id", rid)
        if req.model and req.model != self.name:
            raise InvalidRequestError(f"unknown model {_short(req.model)}; this deployment serves {self.name!r}")
        self._check_text_size(req)
        ids = self._prompt_ids(req)
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; this deployment accepts at most "
                                      f"{self.max_prompt_tokens}")
        sampling = {"max_tokens": self.default_max_tokens, **req.sampling}
        stops = tuple(sampling.pop("stop_token_ids", ()))
        self._check_ids("stop_token_ids", stops)
        params = SamplingParams(**sampling)             # raises for max_tokens < 1, temperature < 0, ...
        eos = () if req.ignore_eos else self.eos_ids     # the pools' engines get ignore_eos too
        params = replace(params, stop_token_ids=tuple(dict.fromkeys((*stops, *eos))), ignore_eos=req.ignore_eos)
        check_top_logprobs(req.top_logprobs)
        for name in ("ttft_slo_s", "tbt_slo_s"):
            v = getattr(req, name)
            if v is not None and not v > 0:
                raise InvalidRequestError(f"slo: {name.removesuffix('_slo_s')}_s must be positive, got {v}")
        return Job(rid, ids, params, req.return_logprobs or req.top_logprobs > 0, req.ttft_slo_s, req.tbt_slo_s,
                   stop=self._check_stop(req.stop), top_logprobs=req.top_logprobs)

    def _check_text_size(self, req: PromptInput) -> None:
        texts = [req.text] if isinstance(req.text, str) else []
        texts += [m.get("content") for m in req.messages or () if isinstance(m, dict)]
        size = sum(len(t.encode(errors="replace")) for t in texts if isinstance(t, str))
        if size > self.max_text_bytes:
            raise InvalidRequestError(f"prompt has {size} bytes of text, more than {self.max_prompt_tokens} tokens "
                                      f"can hold; this deployment accepts at most {self.max_prompt_tokens} tokens")

    def _prompt_ids(self, req: PromptInput) -> list[int]:
        given = [name for name in ("text", "token_ids", "messages") if getattr(req, name) is not None]
        if len(given) > 1:
            raise InvalidRequestError(f"set one prompt, not {' and '.join(given)}")
        if req.messages is not None:
            if req.chat:
                raise InvalidRequestError("chat applies to a text prompt; messages are always a chat")
            return self._chat_ids(req.messages)
        if req.token_ids is not None:
            if req.chat:
                raise InvalidRequestError("chat applies to a text prompt, not to token_ids")
            if not req.token_ids:
                raise InvalidRequestError("prompt is empty: token_ids has no ids")
            self._check_ids("token_ids", req.token_ids)
            return list(req.token_ids)
        if req.text is None:
            raise InvalidRequestError("prompt is empty: set text or token_ids")
        if not req.text:
            raise InvalidRequestError("prompt is empty: text is an empty string")
        if req.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": req.text}])
        else:
            ids = self.tokenizer.encode(req.text)
        if not ids:
            raise InvalidRequestError("prompt is empty after tokenization")
        return ids

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation with the assistant's turn to answer next."""
        if not messages:
            raise InvalidRequestError("messages is empty: send at least one message")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidRequestError(f"messages[{i}] must be an object with a role and a content")
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
            if role not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)} or "
                                          f"developer, got {_short(str(role))}")
            if not isinstance(content, str):
                raise InvalidRequestError(f"messages[{i}].content must be a string")
            turns.append({"role": role, "content": content})
        if not any(t["content"] for t in turns):
            raise InvalidRequestError("messages: every message is empty")
        return self.tokenizer.apply_chat_template(turns)

    @staticmethod
    def _check_stop(stop) -> tuple[str, ...]:
        stop = tuple(stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop[{i}] must be a non-empty string")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_CHARS}")
        return tuple(dict.fromkeys(stop))

    def _check_ids(self, what: str, ids) -> None:
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < self.vocab_size]
        if bad:
            shown = ", ".join(f"{t} at position {i}" for i, t in bad[:5])
            raise InvalidRequestError(f"{what}: {len(bad)} id(s) outside the vocabulary [0, "
                                      f"{self.vocab_size}): {shown}")
