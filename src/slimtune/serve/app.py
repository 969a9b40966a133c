"""The HTTP routes: OpenAI's chat and text completions (streamed as server-sent events or not), the
model list, vLLM's adapter load / unload, and a health check.

A route checks the request completely (model name, fields, limits) before anything is queued, then
hands one `Generation` per prompt to the engine and turns the engine's events into the response. A
stream sends `data: {chunk}` lines, the last chunk of each choice with its `finish_reason`, then
`data: [DONE]`; a client that disconnects cancels its generation at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimtune.data.render import ChatRenderer
from slimtune.errors import AdapterError
from slimtune.methods.multi import Mixture, RowEntry, parse_mixture
from slimtune.routing import prompt_text
from slimtune.serve import schemas
from slimtune.serve.engine import Delta, Engine, Event, Failed, Finished, Generation
from slimtune.serve.errors import APIError, FaultBoundary, error_body
from slimtune.serve.registry import AdapterRegistry
from slimtune.serve.images import ImageLimits, has_images, image_chat_completion
from slimtune.serve.route import ServeRouter
from slimtune.serve.sampling import SamplingParams
from slimtune.serve.security import APIKeyMiddleware, BodyLimitMiddleware, HostCheckMiddleware, ServeLimits

log = logging.getLogger("slimtune.serve")
AUTO = object()  # `adapter_for`'s answer for the route name: the router picks once the prompt is known


@dataclass
class ServerState:
    """Everything the routes share; `inflight` counts prompts queued or being generated."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: object
    base_name: str
    limits: ServeLimits
    context_length: int
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0
    router: ServeRouter | None = None  # `model: "auto"` (router.name): the adapter closest to the prompt
    processor: object = None  # a vision-language model's processor (image parts), else None
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    async def routed(self, adapter: RowEntry | object, model: str, text: str) -> tuple[RowEntry, str]:
        """(adapter, model name to report): the router's pick when `adapter` is AUTO, else unchanged."""
        if adapter is not AUTO:
            return adapter, model
        chosen = await asyncio.wrap_future(self.engine.call(lambda: self.router.pick(text)))
        return chosen.name, chosen.name or self.base_name

    def adapter_for(self, model: str) -> RowEntry:
        """The adapter a request's `model` names (None: the base model), a `Mixture` for a weighted mixture of
        loaded adapters ('extract:0.7+docs:0.3'), or 404."""
        if model == self.base_name:
            return None
        if model in self.registry.paths:
            return model
        if self.router is not None and model == self.router.name:
            return AUTO
        if "+" in model or ":" in model:
            return self.mixture_for(model)
        offered = ", ".join([self.base_name, *self.registry.paths])
        raise APIError(404, f"model {model!r} does not exist: this server offers {offered}", param="model",
                       code="model_not_found")

    def mixture_for(self, model: str) -> Mixture:
        """The mixture `model` writes, after checking it: 400 for bad syntax or DoRA parts, 404 for unknown names."""
        try:
            mixture = parse_mixture(model)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="model") from None
        unknown = [name for name in mixture.names if name not in self.registry.paths]
        if unknown:
            raise APIError(404, f"mixture {model!r} names adapters that are not loaded: {', '.join(unknown)}; loaded: "
                                f"{', '.join(self.registry.paths) or '(none)'}", param="model", code="model_not_found")
        try:
            self.registry.adapters.check_mixture(mixture)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="model") from None
        return mixture

    def sampling(self, body: schemas._Sampling, longest_prompt: int, prompt_param: str) -> SamplingParams:
        """The request's generation settings, checked against the server's limits and the model's context."""
        body.check_supported()
        limits = self.limits
        if longest_prompt == 0:
            raise APIError(400, "the prompt is empty: send at least one token of text", param=prompt_param)
        if longest_prompt > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {longest_prompt} tokens, over this server's limit of "
                                f"{limits.max_prompt_tokens}: shorten it", param=prompt_param, code="prompt_too_long")
        requested = body.requested_max_tokens()
        if requested is not None and requested > limits.max_tokens:
            raise APIError(400, f"max_tokens={requested} is over this server's limit of {limits.max_tokens}: "
                                "ask for fewer", param="max_tokens")
        max_tokens = requested if requested is not None else limits.default_max_tokens
        if longest_prompt + max_tokens > self.context_length:
            if requested is not None:
                raise APIError(400, f"the prompt ({longest_prompt} tokens) plus max_tokens={requested} exceed the "
                                    f"model's context of {self.context_length} tokens: lower max_tokens or shorten "
                                    "the prompt", param="max_tokens")
            max_tokens = self.context_length - longest_prompt  # no explicit ask: fit the context
            if max_tokens < 1:
                raise APIError(400, f"the prompt ({longest_prompt} tokens) fills the model's context of "
                                    f"{self.context_length} tokens: shorten it", param=prompt_param)
        stop = body.stop_strings()
        if len(stop) > limits.max_stop:
            raise APIError(400, f"{len(stop)} stop strings given; at most {limits.max_stop} are allowed", param="stop")
        longest_stop = max(map(len, stop), default=0)
        if longest_stop > limits.max_stop_chars:
            raise APIError(400, f"a stop string of {longest_stop} characters is over this server's limit of "
                                f"{limits.max_stop_chars}: use a shorter one", param="stop")
        if longest_prompt + max_tokens > self.engine.kv_tokens:
            raise APIError(400, f"the prompt ({longest_prompt} tokens) plus max_tokens={max_tokens} exceed this "
                                f"server's KV-cache budget of {self.engine.kv_tokens} tokens (--max-kv-tokens): lower "
                                "max_tokens or shorten the prompt", param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed,
                              ignore_eos=body.ignore_eos)


class _Mailbox:
    """Events from the engine thread to one event loop, with one wake-up per burst.

    A decode step sends one event per row (up to the batch size) within a few microseconds; handing
    each to `call_soon_threadsafe` wakes the loop once per event (a self-pipe write and a context switch
    each, on the cores the engine's matmul threads need). Here only the event that finds the mailbox
    empty schedules a delivery; the delivery takes everything posted by then."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        """Called on the engine thread; RuntimeError once the loop has closed (nobody is listening)."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a delivery is already scheduled and will take this event too
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    if loop not in _mailboxes:
        _mailboxes[loop] = _Mailbox(loop)
    return _mailboxes[loop]


class Submission:
    """The prompts of one request, queued on the engine; `events()` yields what the engine sends back."""

    def __init__(self, state: ServerState, prompts: list[list[int]], adapter: RowEntry, params: SamplingParams
                 ) -> None:
        if state.inflight + len(prompts) > state.limits.max_concurrent:
            raise APIError(429, f"the server is busy ({state.inflight} prompts in flight, limit "
                                f"{state.limits.max_concurrent}): retry shortly", code="too_many_requests")
        self.state = state
        self.events_queue: asyncio.Queue[Event] = asyncio.Queue()
        mailbox = _mailbox(asyncio.get_running_loop())

        def sink(event: Event) -> None:  # called on the engine thread
            mailbox.post(self.events_queue, event)

        self.generations = [Generation(ids, adapter, params, sink, index) for index, ids in enumerate(prompts)]
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        state.inflight += len(prompts)
        self.closed = False
        for generation in self.generations:
            state.engine.submit(generation)

    async def events(self) -> AsyncIterator[Event]:
        remaining = len(self.generations)
        while remaining:
            event = await self.events_queue.get()
            if isinstance(event, (Finished, Failed)):
                remaining -= 1
            yield event

    def close(self) -> None:
        """Cancel whatever is still generating (a disconnect, an error) and free the request's slots."""
        if not self.closed:
            self.closed = True
            for generation in self.generations:
                generation.cancel()
            self.state.inflight -= len(self.generations)


async def _collect(submission: Submission) -> tuple[list[str], list[str], int]:
    """(text per choice, finish_reason per choice, completion tokens) of a finished submission."""
    count = len(submission.generations)
    texts, reasons, completion = [""] * count, [""] * count, 0
    try:
        async for event in submission.events():
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):
                texts[event.index] += event.text
            else:
                reasons[event.index] = event.reason
                completion += event.completion_tokens
    finally:
        submission.close()
    return texts, reasons, completion


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(submission: Submission, chunk: Callable[[int, str | None, str | None], dict],
                  opening: list[dict], usage_chunk: Callable[[int], dict] | None) -> AsyncIterator[str]:
    """Server-sent events of a submission: the `opening` chunks, one `chunk(index, text, finish_reason)`
    per piece of text and per finished choice, the usage chunk if asked for, then [DONE]."""
    completion = 0
    try:
        for payload in opening:
            yield _sse(payload)
        async for event in submission.events():
            if isinstance(event, Delta):
                yield _sse(chunk(event.index, event.text, None))
            elif isinstance(event, Finished):
                completion += event.completion_tokens
                yield _sse(chunk(event.index, None, event.reason))
            else:  # the stream has started, so the error travels inside it, as OpenAI's API does
                yield _sse(event.error.body())
        if usage_chunk is not None:
            yield _sse(usage_chunk(completion))
        yield _sse("[DONE]")
    finally:
        submission.close()


def create_app(state: ServerState, api_key: str | None = None, allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The ASGI app serving `state`; the engine thread runs while the app does (its lifespan). With
    `allowed_hosts`, only requests with one of those Host headers are answered."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="slimtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodyLimitMiddleware, limit=state.limits.max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts)
    app.add_middleware(FaultBoundary)  # added last, so it runs first and sees every other layer's faults

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}; send a JSON object"
            return JSONResponse(error_body(400, message, code="invalid_json"), status_code=400)
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        got = f" (got {first['input']!r})" if "input" in first and first.get("type") != "missing" else ""
        return JSONResponse(error_body(400, f"{param or 'body'}: {first.get('msg')}{got}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        if not state.engine.running:
            raise APIError(503, "the engine thread has stopped: restart the server", code="engine_stopped")
        return {"status": "ok"}

    def model_card(name: str, parent: str | None, root: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "slimtune", "root": root,
                "parent": parent}

    def model_cards() -> list[dict]:
        routed = [model_card(state.router.name, state.base_name, state.base_name)] if (
            state.router and state.router.offered()) else []
        return [model_card(state.base_name, None, state.base_name), *(
            model_card(name, state.base_name, str(path.relative_to(state.registry.root)))
            for name, path in state.registry.paths.items()), *routed]

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        state.adapter_for(model_id)  # 404 for an unknown name
        card = next((card for card in model_cards() if card["id"] == model_id), None)
        if card is None:  # a mixture: valid to request, but not a model of its own
            raise APIError(404, f"{model_id!r} is a mixture of adapters, not a listed model", param="model",
                           code="model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest):
        adapter = state.adapter_for(body.model)
        if has_images(body):  # image parts: serve/images.py
            if adapter is AUTO or isinstance(adapter, Mixture):
                raise APIError(400, f"model {body.model!r}: routing and adapter mixtures serve text requests only; "
                               "name one adapter or the base model for a request with images", param="model")
            return await image_chat_completion(state, body, adapter)
        conversation = body.conversation()
        prompt = ChatRenderer(state.tokenizer).encode_prompt(conversation)  # as `slimtune generate` does
        params = state.sampling(body, len(prompt), "messages")
        adapter, model = await state.routed(adapter, body.model, prompt_text(conversation))
        submission = Submission(state, [prompt], adapter, params)
        request_id = schemas.new_id("chatcmpl")
        if not body.stream:
            texts, reasons, completion = await _collect(submission)
            return schemas.chat_completion(request_id, model, texts, reasons,
                                           schemas.usage(submission.prompt_tokens, completion))
        created = int(time.time())

        def chunk(index: int, text: str | None, reason: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return schemas.chat_chunk(request_id, model, created, index, delta, reason)

        opening = [schemas.chat_chunk(request_id, model, created, 0, {"role": "assistant", "content": ""}, None)]
        return StreamingResponse(_stream(submission, chunk, opening, _usage_chunk(body, model, submission, request_id,
                                                                                 "chat.completion.chunk", created)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest):
        adapter = state.adapter_for(body.model)
        prompts = _completion_prompts(body.prompt, state.tokenizer)
        params = state.sampling(body, max(len(p) for p in prompts), "prompt")
        # Several prompts share one adapter: a routed request goes where its first prompt points.
        adapter, model = await state.routed(adapter, body.model, state.tokenizer.decode(prompts[0],
                                                                                        skip_special_tokens=True))
        submission = Submission(state, prompts, adapter, params)
        request_id = schemas.new_id("cmpl")
        if not body.stream:
            texts, reasons, completion = await _collect(submission)
            return schemas.text_completion(request_id, model, texts, reasons,
                                           schemas.usage(submission.prompt_tokens, completion))
        created = int(time.time())

        def chunk(index: int, text: str | None, reason: str | None) -> dict:
            return schemas.text_chunk(request_id, model, created, index, text or "", reason)

        return StreamingResponse(_stream(submission, chunk, [], _usage_chunk(body, model, submission, request_id,
                                                                             "text_completion", created)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: schemas.LoadAdapterRequest) -> dict:
        registry = state.registry
        if state.router is not None and body.lora_name == state.router.name:
            raise APIError(400, f"'{body.lora_name}' is this server's routing name: choose another adapter name",
                           param="lora_name")
        path = await asyncio.wrap_future(state.engine.call(lambda: registry.load(body.lora_name, body.lora_path)))
        log.info("loaded adapter '%s' from %s", body.lora_name, path)
        return {"object": "lora_adapter", "id": body.lora_name, "parent": state.base_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: schemas.UnloadAdapterRequest) -> dict:
        engine, registry = state.engine, state.registry
        await asyncio.wrap_future(engine.call(lambda: registry.unload(body.lora_name, engine.users(body.lora_name))))
        log.info("unloaded adapter '%s'", body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "deleted": True,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return app


def _usage_chunk(body: schemas._Sampling, model: str, submission: Submission, request_id: str, obj: str, created: int
                 ) -> Callable[[int], dict] | None:
    """With `stream_options.include_usage`, the builder of a stream's closing usage chunk."""
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return lambda completion: schemas.usage_chunk(request_id, model, created, obj,
                                                  schemas.usage(submission.prompt_tokens, completion))


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt of a text completion request (text gets the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list: send a string or a list of strings", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    prompts = []
    for item in prompt:
        ids = list(tokenizer(item)["input_ids"]) if isinstance(item, str) else list(item)
        if any(not 0 <= t < len(tokenizer) for t in ids):
            raise APIError(400, f"prompt holds token ids outside the vocabulary (0..{len(tokenizer) - 1})",
                           param="prompt")
        prompts.append(ids)
    return prompts
