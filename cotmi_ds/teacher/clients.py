"""Teachers. Each takes a batch of requests and returns their completions; the job runs ``slots``
batches at once per teacher and several teachers side by side.

- ``Endpoint``: an OpenAI-compatible server through the official ``openai`` client (async). Timeouts,
  retries with exponential back-off, and Retry-After on 429/503 are the client's own
  (``--timeout_s``, ``--max_retries``). What is left after the retries is sorted here:
  ``Rejected`` (the server refuses this request: 400, 413, 422), ``Unavailable`` (the server is
  down or overloaded: the request stays unanswered for a later run) or a ``UsageError`` (a wrong key,
  URL or API: the job cannot work).
- ``LocalModel``: a causal LM loaded with transformers in this process, batched generate().
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cotmi_ds.errors import UsageError
from cotmi_ds.teacher.options import TeachOptions, api_key


@dataclass(frozen=True)
class Request:
    key: str                               # the cache key (job.py)
    split: str
    row: int                               # index in the split
    sample: int
    body: list[dict[str, str]] | str       # chat messages or a completion prompt


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Rejected(Exception):
    """The server refused this request (it would refuse it again): recorded, not asked again."""


class Unavailable(Exception):
    """The server could not answer after the client's retries: the request stays unanswered."""


def decoding(opts: TeachOptions, stop: tuple[str, ...]) -> dict[str, Any]:
    """The sampling settings every request carries (the seed is added per sample when sampling)."""
    out: dict[str, Any] = {"max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p}
    if stop:
        out["stop"] = list(stop)
    return out


class Endpoint:
    def __init__(self, url: str, opts: TeachOptions, stop: tuple[str, ...]):
        import openai

        self.url, self.opts, self.slots, self.batch = url, opts, opts.concurrency, 1
        self._key = api_key(opts)
        self.client = openai.AsyncOpenAI(base_url=url, api_key=self._key, timeout=opts.timeout_s,
                                         max_retries=opts.max_retries)
        self.model = opts.model
        self.params = decoding(opts, stop)

    def redact(self, text: str) -> str:
        """A server may echo what it was sent: never let the key reach a message."""
        return text.replace(self._key, "***") if self._key != "EMPTY" else text

    async def check(self) -> str:
        """The model to ask, from GET /models: a wrong URL, key or model name is one line here."""
        import openai

        try:
            listed = [m.id async for m in self.client.with_options(max_retries=1, timeout=30).models.list()]
        except openai.APIConnectionError as e:
            raise UsageError(f"--base_url {self.url}: no answer ({self.redact(str(e.__cause__ or e))}); is the "
                             "server running and the URL right (it usually ends in /v1)?") from None
        except openai.APIStatusError as e:
            raise self._fatal(e, "GET /models") from None
        if self.model is None:
            if len(listed) != 1:
                raise UsageError(f"--base_url {self.url} serves {len(listed)} models ({', '.join(listed) or 'none'}): "
                                 "pick one with --model")
            self.model = listed[0]
        elif self.model not in listed:
            raise UsageError(f"--model {self.model}: not served at {self.url} (it serves: {', '.join(listed) or 'nothing'})")
        return self.model

    def _fatal(self, e, what: str) -> UsageError:
        hint = {401: "the server refused the API key: set --api_key_env to the variable that holds it",
                403: "the key may not use this model or endpoint",
                404: "no such endpoint there: the URL usually ends in /v1"
                     + ("; --api chat if the server has no /completions" if self.opts.api == "completion" else "")}
        return UsageError(f"--base_url {self.url}: {what} answered HTTP {e.status_code} "
                          f"({self.redact(_message(e))}); {hint.get(e.status_code, 'check the server log')}")

    async def answer(self, requests: list[Request]) -> list[Answer]:
        import openai

        (request,) = requests
        params = dict(self.params)
        if self.opts.temperature > 0:
            params["seed"] = self.opts.seed + request.sample
        chat = isinstance(request.body, list)
        body = {"model": self.model, ("messages" if chat else "prompt"): request.body, **params}
        try:
            # The client's generic POST (its documented way to any endpoint): its retries, back-off
            # and timeouts, without building and validating typed request and response objects,
            # which cost more CPU than the rest of a request (docs/teacher.md, the bench).
            r = await self.client.post("/chat/completions" if chat else "/completions", body=body, cast_to=object)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
            raise Unavailable(f"{self.url}: {self.redact(_message(e))}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise self._fatal(e, "POST " + ("/chat/completions" if chat else "/completions")) from None
        except openai.APIStatusError as e:
            if e.status_code in (408, 409) or e.status_code >= 500:
                raise Unavailable(f"{self.url}: HTTP {e.status_code} ({self.redact(_message(e))})") from None
            raise Rejected(f"HTTP {e.status_code}: {self.redact(_message(e))}") from None
        try:
            choice = r["choices"][0]
            text = choice["message"].get("content") if chat else choice.get("text")
            usage = r.get("usage") or {}
            return [Answer(text or "", choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0))]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise Rejected(f"not a completion: {self.redact(str(r))[:200]}") from None

    async def close(self) -> None:
        await self.client.close()


def _message(e: Exception) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return " ".join(text.split())[:300]


class LocalModel:
    """A causal LM in this process: batches of ``--batch_size`` prompts, left-padded, one at a time."""

    def __init__(self, opts: TeachOptions, stop: tuple[str, ...]):
        self.opts, self.stop, self.slots, self.batch = opts, stop, 1, opts.batch_size
        self.url = f"in-process:{opts.model}"

    async def check(self) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cotmi_ds.model.hub import resolve  # a hub name: no wait on retries offline, one line naming --model

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve(self.opts.model, "--model", "tokenizer"),
                                                           padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(resolve(self.opts.model, "--model")).eval()
        except OSError as e:
            raise UsageError(f"--model {self.opts.model}: cannot load it ({_message(e)})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.opts.api == "chat" and not self.tokenizer.chat_template:
            raise UsageError(f"--model {self.opts.model}: its tokenizer has no chat template; use --api completion")
        return self.opts.model

    async def answer(self, requests: list[Request]) -> list[Answer]:
        return await asyncio.to_thread(self._generate, requests)

    def _generate(self, requests: list[Request]) -> list[Answer]:
        import torch

        tok = self.tokenizer
        chat = isinstance(requests[0].body, list)
        texts = [tok.apply_chat_template(r.body, tokenize=False, add_generation_prompt=True) if chat else r.body
                 for r in requests]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        sampling = self.opts.temperature > 0
        if sampling:  # one seed per batch: the first request's
            torch.manual_seed(self.opts.seed + requests[0].sample * 1_000_003 + requests[0].row)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.opts.max_tokens, do_sample=sampling,
                                      **({"temperature": self.opts.temperature, "top_p": self.opts.top_p}
                                         if sampling else {}), pad_token_id=tok.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        answers = []
        for i, ids in enumerate(new):
            text = tok.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            produced = int((ids != tok.pad_token_id).sum())
            answers.append(Answer(text[:cut] if cut >= 0 else text, "stop" if cut >= 0 or produced < len(ids)
                                  else "length", int(enc.attention_mask[i].sum()), produced))
        return answers

    async def close(self) -> None:
        pass


def teachers(opts: TeachOptions, stop: tuple[str, ...]) -> list[Endpoint | LocalModel]:
    if opts.backend == "transformers":
        return [LocalModel(opts, stop)]
    return [Endpoint(url, opts, stop) for url in opts.base_urls]
