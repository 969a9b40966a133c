"""The decode loop: one thread owns the model and generates for every request at once.

Requests (`Generation`) are queued from the web server's thread. Each turn of the loop
1. runs queued commands (adapter load / unload) and takes queued requests,
2. admits waiting requests while the batch has room (rows, and KV-cache tokens: `kvbudget`): their
   prompts are prefilled together in one left-padded forward pass (each row with its own adapter),
   which fills their KV cache and gives each its first token; those rows then join the decode batch
   (continuous batching);
3. decodes one token for every row of the batch in one forward pass over the KV cache, row i using
   adapter names[i] (`AdapterSet.per_row`), and drops the rows that finished or were cancelled.
So requests for different adapters and for the base model share every forward pass, and a new
request waits at most one decode step before its prefill, unless the batch is full.

Results go back through each request's `sink` as `Delta` / `Finished` / `Failed` events, called on
this thread; the web server turns them into responses. A failing forward pass fails the requests in
it (a 500 naming only an id; the traceback is logged under it) and the loop goes on with an empty batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from slimtune.methods.multi import AdapterSet, Mixture, RowEntry
from slimtune.serve.detokenize import TextStream
from slimtune.serve.errors import APIError, new_fault_id, server_fault
from slimtune.serve.kvbatch import DecodeBatch, check_servable, new_cache, prefill_inputs
from slimtune.serve.kvbudget import derive_kv_tokens, kv_tokens_needed
from slimtune.serve.sampling import SamplingParams, make_generator, next_tokens

log = logging.getLogger("slimtune.serve")


@dataclass(frozen=True)
class Delta:
    """New reply text of prompt `index` of a request."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Prompt `index` is done: `reason` is 'stop' (EOS or a stop string) or 'length' (max_tokens)."""

    index: int
    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Prompt `index` could not be finished."""

    index: int
    error: APIError


Event = Delta | Finished | Failed


class Generation:
    """One prompt to complete: what it asks for, where its events go, and its decoding state."""

    def __init__(self, prompt_ids: list[int], adapter: RowEntry, params: SamplingParams,
                 sink: Callable[[Event], None], index: int = 0) -> None:
        self.prompt_ids = prompt_ids
        self.adapter = adapter  # an adapter's name, a Mixture of adapters, or None: the base model
        self.params = params
        self.sink = sink
        self.index = index
        self.cancelled = False  # set from the web server's thread; read by the engine between steps
        self.generator = make_generator(params.seed)
        self.completion_tokens = 0
        self.last_token = -1
        self.text: TextStream | None = None  # made by the engine, which holds the tokenizer

    @property
    def max_length(self) -> int:
        """The most tokens this row can hold in the KV cache: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the receiving event loop has closed: nobody is waiting any more
            self.cancelled = True


class _Command:
    """A function to run on the engine thread between steps (it owns the model), with its result."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: Future = Future()

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
            self.future.set_exception(exc)


_STOP = object()


class ModelThread:
    """One thread for a served model's torch work: first the loading (`run`), then the engine's loop.

    On CPU, OpenMP gives every thread that runs parallel work its own team of worker threads. With two
    teams (the thread that loaded the model and the engine's) on a few cores there are more OpenMP threads
    than CPUs, libgomp stops letting idle workers spin, and every parallel region pays a wake-up: a bf16
    decode step's small matmuls ran 2x slower on the engine thread than on the thread that had loaded the
    model (148 vs 74 us for (32 x 576) @ (576 x 1536), 2 cores), and the bf16 server used one core.
    Loading and decoding on the same thread keeps one team."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="slimtune-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() on this thread; its result (or exception) here."""
        command = _Command(fn)
        self._jobs.put(command)
        return command.future.result()

    def hand_over(self, loop: Callable[[], None]) -> None:
        """Run `loop` on this thread as its last job (the engine's loop); the thread ends with it."""
        self._jobs.put(_Command(loop))
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def _logged_fault(stage: str) -> APIError:
    """Log the exception being handled under a new id; the 500 its requests get names only that id."""
    fault_id = new_fault_id()
    log.exception("%s failed (request id %s)", stage, fault_id)
    return server_fault(fault_id, "generation failed")


def _adapter_names(entry: RowEntry) -> list[str]:
    """The adapters a request's entry uses."""
    if isinstance(entry, Mixture):
        return entry.names
    return [] if entry is None else [entry]


def _capacity(rows: list[Generation]) -> int:
    """Cache columns the decode batch of `rows` can come to need before its rows change (kvbatch.py): the
    longest prompt + max_tokens among them, the width the KV budget already counts (kvbudget.py)."""
    return max((g.max_length for g in rows), default=0)


class Engine:
    """Owns `model` (with `adapters`) on one thread and decodes all requests together."""

    def __init__(self, model: torch.nn.Module, tokenizer, adapters: AdapterSet, max_batch: int = 64,
                 prefill_tokens: int = 4096, kv_tokens: int | None = None, thread: ModelThread | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        # The KV cache's budget in tokens (see kvbudget.py); requests wait in the queue while it is full.
        self.kv_tokens = kv_tokens if kv_tokens is not None else derive_kv_tokens(model)
        check_servable(model.config)  # refuses models whose cache cannot be batched this way
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_token_id  # the same stop token `slimtune generate` uses
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._work: queue.Queue = queue.Queue()
        self._pending: deque[Generation] = deque()
        self._rows: list[Generation] = []  # row i of `_batch`
        self._batch = DecodeBatch()
        self._thread: ModelThread | None = None
        self._model_thread = thread  # the thread that loaded the model, if any: the loop runs on it

    # --- called from other threads ------------------------------------------------------------------

    def start(self) -> None:
        given, self._model_thread = self._model_thread, None
        self._thread = given if given is not None and given.is_alive() else ModelThread()
        self._thread.hand_over(self._loop)

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is still queued or running (503) and end the thread."""
        if self._thread is not None:
            self._work.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive (what /health reports)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, generation: Generation) -> None:
        self._work.put(generation)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps; the future holds its result or exception."""
        command = _Command(fn)
        self._work.put(command)
        return command.future

    # --- the engine thread ---------------------------------------------------------------------------

    def users(self, adapter: str) -> int:
        """How many queued or running requests use `adapter`, alone or in a mixture (call on the engine thread)."""
        return sum(adapter in _adapter_names(g.adapter) and not g.cancelled for g in (*self._pending, *self._rows))

    def _loop(self) -> None:
        while self._take_work(block=not (self._rows or self._pending)):
            group = self._admit()
            if group:
                try:
                    self._prefill(group)
                except Exception:  # noqa: BLE001 - one bad prefill must not stop the server
                    self._fail(group, _logged_fault("prefill"))
            if self._rows:
                try:
                    self._decode_step()
                except Exception:  # noqa: BLE001 - nor one bad decode step
                    self._fail(self._rows, _logged_fault("decode step"))
                    self._rows, self._batch = [], DecodeBatch()
        self._fail([*self._pending, *self._rows], APIError(503, "the server is shutting down: retry later"))

    def _take_work(self, block: bool) -> bool:
        """Run queued commands and move queued requests to `_pending`; False once asked to stop."""
        while True:
            try:
                item = self._work.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Command):
                item.run()
            else:
                self._pending.append(item)

    def _fail(self, generations: list[Generation], error: APIError) -> None:
        for generation in generations:
            if not generation.cancelled:
                generation.send(Failed(generation.index, error))

    def _admit(self) -> list[Generation]:
        """Waiting requests that fit into the batch now, in arrival order: their prompts within the prefill
        budget, and the batch's KV cache within its budget however long every row runs (kvbudget.py)."""
        group: list[Generation] = []
        tokens = 0
        lengths = [g.max_length for g in self._rows]
        while self._pending and len(self._rows) + len(group) < self.max_batch:
            generation = self._pending[0]
            if generation.cancelled:
                self._pending.popleft()
                continue
            gone = [name for name in _adapter_names(generation.adapter) if name not in self.adapters.names]
            if gone:
                self._pending.popleft()  # unloaded while the request waited
                generation.send(Failed(generation.index, APIError(
                    404, f"adapter '{gone[0]}' was unloaded before this request started", param="model",
                    code="model_not_found")))
                continue
            if group and tokens + len(generation.prompt_ids) > self.prefill_tokens:
                break
            # Alone, a request always goes ahead: the route refused the ones that exceed the budget by themselves.
            if lengths and kv_tokens_needed([*lengths, generation.max_length]) > self.kv_tokens:
                break
            tokens += len(generation.prompt_ids)
            lengths.append(generation.max_length)
            group.append(self._pending.popleft())
        return group

    @torch.no_grad()
    def _prefill(self, group: list[Generation]) -> None:
        ids, mask, positions = prefill_inputs([g.prompt_ids for g in group], self.pad_id, self.device)
        cache = new_cache()
        with self.adapters.per_row([g.adapter for g in group]):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]  # (rows, vocab)
        for generation in group:
            generation.text = TextStream(self.tokenizer, generation.params.stop)
        alive = self._take_tokens(group, logits)
        joining = DecodeBatch()
        joining.add(cache, mask)
        joining.keep(alive)
        if alive:
            self._rows.extend(group[i] for i in alive)
            self._batch.add(joining.cache, joining.mask, _capacity(self._rows))

    @torch.no_grad()
    def _decode_step(self) -> None:
        live = [i for i, g in enumerate(self._rows) if not g.cancelled]
        self._rows = [self._rows[i] for i in live]
        self._batch.keep(live, _capacity(self._rows))
        if not self._rows:
            return
        input_ids = torch.tensor([[g.last_token] for g in self._rows], device=self.device)  # (rows, 1)
        attention_mask, positions = self._batch.step_inputs()
        with self.adapters.per_row([g.adapter for g in self._rows]):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                cache=self._batch.cache, use_cache=True).logits[:, -1]
        self._batch.advance(attention_mask)
        alive = self._take_tokens(self._rows, logits)
        self._rows = [self._rows[i] for i in alive]
        self._batch.keep(alive, _capacity(self._rows))

    def _take_tokens(self, rows: list[Generation], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, send its text and, if it is done, its end; returns the rows that go on."""
        tokens = next_tokens(logits.float(), [g.params for g in rows], [g.generator for g in rows])
        alive: list[int] = []
        for i, (generation, token) in enumerate(zip(rows, tokens)):
            if generation.cancelled:
                continue
            generation.completion_tokens += 1
            generation.last_token = token
            reason = None
            if token == self.eos_id and not generation.params.ignore_eos:
                text, reason = generation.text.finish(), "stop"
            else:
                text = generation.text.push(token)
                if generation.text.stopped:
                    reason = "stop"
                elif generation.completion_tokens >= generation.params.max_tokens:
                    text, reason = text + generation.text.finish(), "length"
            if text:
                generation.send(Delta(generation.index, text))
            if reason is None:
                alive.append(i)
            else:
                generation.send(Finished(generation.index, reason, len(generation.prompt_ids),
                                         generation.completion_tokens))
        return alive
