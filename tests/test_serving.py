"""Serving real users: cancelled streams stop, out-of-memory is one line and the model keeps serving, image caches
fit a byte budget, trace recording reads nothing back per layer, and the app makes one GPU call per action."""

import types

import gradio as gr
import pytest
import torch

from app import runtime
from app.events import Events, new_session
from flexattn import DeviceMemoryError, memory
from flexattn.bench.syncs import HostReads
from flexattn.pipeline import FlexVLM

from .conftest import make_vlm, random_image

QUESTION = "what letter is on the red circle ?"


@pytest.fixture(scope="module")
def vlm() -> FlexVLM:
    return make_vlm(seed=2, num_layers=3, selection_layer=1, lowres_size=56, threshold=100)


@pytest.fixture(scope="module")
def image():
    return random_image(80, 60, seed=3)


@pytest.fixture
def passes(vlm):
    """How many forward passes (one per generated token) the model has made."""
    calls = {"n": 0}

    def count(module, args, kwargs):
        calls["n"] += 1

    handle = vlm.model.register_forward_pre_hook(count, with_kwargs=True)
    yield calls
    handle.remove()


# ---- cancellation ------------------------------------------------------------------------------------------------
def test_closing_a_stream_stops_generation_and_frees_the_model(vlm, image, passes):
    """EOS can never win in the test model, so without cancellation this would run 512 tokens, holding the lock."""
    stream = vlm.stream(image, QUESTION, max_new_tokens=512, trace=False)
    chunks = [next(stream), next(stream)]
    assert all(isinstance(c, str) for c in chunks)
    at_close = passes["n"]
    stream.close()
    assert passes["n"] - at_close <= 2  # tokens generated after the close: the one in flight, at most one more
    assert at_close < 512
    assert vlm._lock.acquire(blocking=False)  # the next question starts without waiting for the old one
    vlm._lock.release()
    before = passes["n"]
    got = vlm.answer(image, QUESTION, max_new_tokens=3, trace=False)
    assert got.stats.generated_tokens == 3 and passes["n"] - before == 3


def test_a_finished_stream_is_unchanged_by_cancellation_support(vlm, image):
    *chunks, final = vlm.stream(image, QUESTION, max_new_tokens=6)
    assert "".join(chunks).strip() == final.text and final.stats.generated_tokens == 6
    assert final.token_ids == vlm.answer(image, QUESTION, max_new_tokens=6).token_ids


# ---- out of memory -----------------------------------------------------------------------------------------------
def test_out_of_memory_is_one_line_and_the_model_keeps_serving(image):
    vlm = make_vlm(seed=2, num_layers=3, selection_layer=1, lowres_size=56, threshold=100)
    vlm.answer(random_image(50, 50, seed=9), QUESTION, max_new_tokens=2)
    failures = {"left": 2}

    def out_of_memory(module, args, kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 22.06 GiB\nof which 1.2 GiB is free.")

    vlm.model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    with pytest.raises(DeviceMemoryError) as err:
        vlm.answer(image, QUESTION, max_new_tokens=4)
    message = str(err.value)
    assert message.startswith("out of GPU memory") and "tried to allocate 2.00 gib" in message
    assert "\n" not in message
    assert vlm.cached_bytes == 0 and not vlm._cache  # every cached image released
    with pytest.raises(DeviceMemoryError):  # the streaming path too
        list(vlm.stream(image, QUESTION, max_new_tokens=4))
    assert vlm.answer(image, QUESTION, max_new_tokens=2).stats.generated_tokens == 2  # still serving


# ---- image caches --------------------------------------------------------------------------------------------------
def test_images_are_evicted_to_the_byte_budget_and_released(image):
    vlm = make_vlm(seed=2, num_layers=3, selection_layer=1, lowres_size=56, threshold=100)
    other = random_image(64, 64, seed=4)
    vlm.answer(image, QUESTION, mode="select_all", max_new_tokens=2)
    old = vlm.prepare(image)
    assert old.prompt_cache is not None and old.hr.nbytes > old.hr._buffer.nbytes
    per_image = memory.image_cache_bytes(vlm.model.config, vlm.settings, vlm.model.dtype)
    worst = per_image.worst(old.lr_grid**2 + memory.PROMPT_TEXT_TOKENS)  # what a new image may grow to
    held = old.nbytes
    vlm._cache_budget = worst + held // 2  # room for a new image at its worst, not beside the old one
    vlm.answer(other, QUESTION, mode="select_all", max_new_tokens=2)
    assert len(vlm._cache) == 1 and vlm.cached_bytes <= vlm._cache_budget
    assert old.prompt_cache is None and old.hr.nbytes == old.hr._buffer.nbytes  # released, not just forgotten
    vlm._cache_budget = worst + 2 * held  # with room, both stay
    vlm.answer(image, QUESTION, mode="select_all", max_new_tokens=2)
    assert len(vlm._cache) == 2


def test_cache_budget_is_half_the_free_device_memory(monkeypatch):
    vlm = make_vlm(seed=2, num_layers=3, selection_layer=1, lowres_size=56, threshold=100)
    assert vlm.cache_budget is None  # on the CPU: only the count limit
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: 8 * 10**9)
    vlm.prepare(random_image(60, 60))
    assert vlm.cache_budget == 4 * 10**9 + vlm.cached_bytes // 2


def test_follow_up_from_the_compact_prefix_answers_as_a_fresh_prompt(vlm, image):
    first = vlm.answer(image, QUESTION, max_new_tokens=5)
    history = [(QUESTION, first.text)]
    reused = vlm.answer(image, "what colour is it ?", history=history, max_new_tokens=5)
    fresh = vlm.answer(image, "what colour is it ?", history=history, max_new_tokens=5, reuse_prefix=False)
    assert reused.stats.prefix_tokens_reused > 0 and reused.token_ids == fresh.token_ids
    again = vlm.answer(image, "what colour is it ?", history=history, max_new_tokens=5)
    assert again.token_ids == fresh.token_ids  # the stored prefix was not changed by the reuse


# ---- trace recording -----------------------------------------------------------------------------------------------
def _reads(vlm, image, trace: bool, tokens: int) -> int:
    vlm.clear_cache()
    vlm.prepare(image)
    with HostReads() as reads:
        vlm.answer(image, QUESTION, mode="flex", max_new_tokens=tokens, trace=trace, reuse_prefix=False)
    return reads.total


def test_trace_recording_reads_nothing_back_per_layer(vlm, image):
    """Recording adds at most its one copy per pass (and the unpacking of it), whatever the number of layers."""
    added = [_reads(vlm, image, True, n) - _reads(vlm, image, False, n) for n in (1, 5)]
    assert (added[1] - added[0]) / 4 <= 2
    recorded = vlm.answer(image, QUESTION, mode="flex", max_new_tokens=5)
    assert len(recorded.trace.passes) == 5


# ---- the app's GPU entry point -------------------------------------------------------------------------------------
def test_gpu_duration_follows_the_work():
    seconds = runtime.GPU_TIME.seconds
    short, long = seconds([{"mode": "flex", "max_new_tokens": 64}]), seconds([{"mode": "flex", "max_new_tokens": 512}])
    assert runtime.GPU_TIME.minimum <= short < long
    assert long < 120  # one 512-token answer asks for less than the old fixed 120 s
    lowres = seconds([{"mode": "lowres", "max_new_tokens": 256}])
    assert lowres < seconds([{"mode": "flex", "max_new_tokens": 256}]) < \
        seconds([{"mode": "flex", "max_new_tokens": 256, "avl": object()}])
    runs = [{"mode": m, "max_new_tokens": 64} for m in ("lowres", "flex", "select_all")]
    # Compare is one call: one start-up and one image encoding, not three
    assert seconds(runs) < sum(seconds([r]) for r in runs)
    assert runtime.gpu_seconds("compare", "img.png", QUESTION, runs) == seconds(runs)


def test_gpu_wrapper_takes_a_duration_function(monkeypatch):
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda f: ("wrapped", duration, f))
    monkeypatch.setitem(__import__("sys").modules, "spaces", fake)
    assert runtime.gpu(runtime._run, duration=runtime.gpu_seconds) == ("wrapped", runtime.gpu_seconds, runtime._run)


@pytest.fixture
def served(vlm):
    previous = runtime._MODEL
    runtime.set_model(vlm)
    yield vlm
    runtime._MODEL = previous


def test_compare_is_one_gpu_call_and_errors_are_gr_errors_inside(served, image, monkeypatch, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    calls = []
    real = runtime._on_gpu

    def counting(*args):
        calls.append(args[0])
        yield from real(*args)

    monkeypatch.setattr(runtime, "_on_gpu", counting)
    runs = [{"mode": m, "max_new_tokens": 2, "trace": False} for m in ("lowres", "flex", "select_all")]
    answers = list(runtime.compare(str(path), QUESTION, runs))
    assert calls == ["compare"] and [a.mode for a in answers] == ["lowres", "flex", "select_all"]
    with pytest.raises(gr.Error, match="empty"):  # a ValueError raised in the call arrives as gr.Error
        list(runtime.stream_answer(str(path), "  ", {"max_new_tokens": 2}))

    def oom(*args, **kwargs):
        raise DeviceMemoryError("out of GPU memory while answering")

    monkeypatch.setattr(served, "answer", oom)
    with pytest.raises(gr.Error, match="out of GPU memory"):
        list(runtime.compare(str(path), QUESTION, runs))
    monkeypatch.setattr(served, "answer", lambda *a, **k: 1 / 0)
    with pytest.raises(gr.Error, match="Generation failed in lowres mode"):
        runtime.answer(str(path), QUESTION, runs[0])


def test_closing_the_pages_answer_event_cancels_generation(served, image, passes, tmp_path):
    """Gradio closes an event's generator when the page goes away; the model's stream closes with it."""
    path = tmp_path / "image.png"
    image.save(path)
    events = Events()
    _, state = events.start_turn(str(path), QUESTION, new_session())
    turn = events.answer_turn(state, max_new_tokens=512)
    next(turn), next(turn)
    at_close = passes["n"]
    turn.close()
    assert passes["n"] - at_close <= 2 and served._lock.acquire(blocking=False)
    served._lock.release()
