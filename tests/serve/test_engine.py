"""The batched decode loop: requests decoded together (different adapters, joining mid-decode) give
exactly the tokens each gives alone, and they really share forward passes."""

from __future__ import annotations

import time

import pytest

from slimtune.serve.engine import Delta, Failed, Finished, Generation
from slimtune.serve.sampling import SamplingParams

from serve.support import make_engine


@pytest.fixture
def engine(tiny_model_dir, adapter_root):
    engine = make_engine(tiny_model_dir, adapter_root)
    engine.start()
    yield engine
    engine.stop()


class Recorder:
    """A request's events, as the engine thread sends them."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def done(self) -> bool:
        return any(isinstance(e, (Finished, Failed)) for e in self.events)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def submit(engine, prompt: str, adapter, steps: int = 30, **params) -> tuple[Generation, Recorder]:
    recorder = Recorder()
    ids = list(engine.tokenizer(prompt)["input_ids"])
    generation = Generation(ids, adapter, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, **params),
                            recorder)
    engine.submit(generation)
    return generation, recorder


def wait(recorders, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.done for r in recorders):
        assert time.monotonic() < deadline, "the engine did not finish in time"
        time.sleep(0.005)


REQUESTS = [("The cat sat on", None), ("hi", "alpha"), ("A much longer prompt, to pad the others", "beta"),
            ("hi", "beta"), ("Numbers: 1 2 3", "alpha")]


def test_batched_decode_equals_each_request_alone(engine):
    alone = []
    for prompt, adapter in REQUESTS:
        generation, recorder = submit(engine, prompt, adapter)
        wait([recorder])
        alone.append((generation.text.ids, recorder.text))
    assert len({tuple(ids) for ids, _ in alone}) == len(alone), "the requests must differ, else the test is void"

    batch_rows: list[tuple[int, int]] = []  # (rows, new tokens per row) of every forward pass
    hook = engine.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: batch_rows.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        first = [submit(engine, prompt, adapter) for prompt, adapter in REQUESTS[:2]]
        while first[0][0].completion_tokens < 5:  # the rest join while these two are mid-decode
            time.sleep(0.001)
        rest = [submit(engine, prompt, adapter) for prompt, adapter in REQUESTS[2:]]
        wait([r for _, r in first + rest])
    finally:
        hook.remove()
    for (generation, recorder), (ids, text), (prompt, adapter) in zip(first + rest, alone, REQUESTS):
        assert generation.text.ids == ids, f"{prompt!r} with {adapter!r}: batched greedy tokens must equal alone"
        assert recorder.text == text
        finished = recorder.events[-1]
        assert isinstance(finished, Finished) and finished.reason == "length" and finished.completion_tokens == 30
    decode_rows = [rows for rows, width in batch_rows if width == 1]
    assert max(decode_rows) == len(REQUESTS), \
        f"all five requests (three adapters and the base) must share decode steps; rows per step: {decode_rows}"
    assert len(batch_rows) < 2 * 30, f"batched, the five requests take far fewer forward passes than 5 x 30: {len(batch_rows)}"


def test_cancelled_requests_leave_the_batch(engine):
    long_one, long_recorder = submit(engine, "hi", "alpha", steps=10_000)
    other, other_recorder = submit(engine, "hi", "beta", steps=10)
    wait([other_recorder])
    long_one.cancel()
    deadline = time.monotonic() + 10
    while engine._rows:  # the engine's own state: the cancelled row is dropped at the next step
        assert time.monotonic() < deadline, "a cancelled request must leave the batch"
        time.sleep(0.005)
    assert not long_recorder.done, "a cancelled request gets no further events"
    assert engine._batch.rows == 0 and engine._batch.cache is None, "an empty batch holds no cache"


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(engine):
    generation, recorder = submit(engine, "hi", "alpha", steps=5)
    wait([recorder])
    good = recorder.text
    bad = Generation([10**6], None, SamplingParams(max_tokens=3, temperature=0), Recorder())  # id outside the vocab
    engine.submit(bad)
    wait([bad.sink])
    assert isinstance(bad.sink.events[-1], Failed) and bad.sink.events[-1].error.status == 500
    message = bad.sink.events[-1].error.message
    assert "request id req_" in message and "Error" not in message, f"an id, not the exception: {message}"
    again, again_recorder = submit(engine, "hi", "alpha", steps=5)
    wait([again_recorder])
    assert again_recorder.text == good, "the engine keeps serving after a failed prefill"


def test_unloaded_adapter_fails_its_waiting_request(engine):
    engine.call(lambda: engine.adapters.delete("beta")).result(10)
    _, recorder = submit(engine, "hi", "beta", steps=3)
    wait([recorder])
    assert isinstance(recorder.events[-1], Failed) and recorder.events[-1].error.status == 404
