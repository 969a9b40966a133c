"""Per-machine choices: measured once, cached under $SLIMTUNE_HOME, overridden by the config (timings
themselves are not tested: they depend on the machine)."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.train import tuning
from slimtune.train.packing import packed_attention, set_cpu_attention_maths


class Counting:
    """A measurement that records how often it ran."""

    def __init__(self, best):
        self.best, self.calls = best, 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"best": self.best, "ms": 1.0}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path))
    return tmp_path


def test_measured_once_then_read_from_the_cache(home):
    measure = Counting("bf16")
    assert tuning.cpu_attention_maths("auto", measure=measure) == "bf16"
    assert tuning.cpu_attention_maths("auto", measure=measure) == "bf16"
    assert measure.calls == 1
    cached = json.loads((home / "tuning.json").read_text())
    assert cached[tuning.machine_key()]["cpu_attention@128"]["best"] == "bf16"


def test_attention_is_measured_per_length_band(home):
    """Rows of ~100 and of ~4000 tokens are different questions; lengths in one band share one answer."""
    short, long = Counting("fp32"), Counting("bf16")
    assert tuning.cpu_attention_maths("auto", 112, short) == "fp32"
    assert tuning.cpu_attention_maths("auto", 4096, long) == "bf16"
    assert tuning.cpu_attention_maths("auto", 200, short) == "fp32" and short.calls == 1
    assert tuning.cpu_attention_maths("auto", 3000, long) == "bf16" and long.calls == 1
    assert [tuning.attention_band(n) for n in (1, 200, 300, 1000, 1100, 4000, 5000, 100000)] == \
        [128, 128, 512, 512, 2048, 2048, 8192, 8192]


def test_config_value_overrides_and_measures_nothing(home):
    measure = Counting("bf16")
    assert tuning.cpu_attention_maths("fp32", measure=measure) == "fp32"
    assert tuning.cpu_threads(3, Counting(1)) == 3
    assert measure.calls == 0 and not (home / "tuning.json").exists()


def test_another_machine_measures_again(home, monkeypatch):
    tuning.cpu_threads(None, Counting(2))
    monkeypatch.setattr(tuning, "machine_key", lambda: "another cpu | 64 cpus | torch x")
    other = Counting(32)
    assert tuning.cpu_threads(None, other) == 32 and other.calls == 1
    assert len(json.loads((home / "tuning.json").read_text())) == 2  # both machines kept


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": 5}'])
def test_damaged_cache_is_measured_again_and_rewritten(home, content):
    (home / "tuning.json").write_text(content.replace("%s", tuning.machine_key()))
    measure = Counting("fp32")
    assert tuning.cpu_attention_maths("auto", measure=measure) == "fp32" and measure.calls == 1
    assert tuning.cpu_attention_maths("auto", measure=measure) == "fp32" and measure.calls == 1


def test_unwritable_home_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SLIMTUNE_HOME", str(blocker / "home"))  # a path below a file: cannot be created
    measure = Counting(2)
    assert tuning.cpu_threads(None, measure) == 2


def test_thread_setting_applied_unless_chosen_elsewhere(home, monkeypatch):
    previous = torch.get_num_threads()
    try:
        tuning.apply_cpu_threads(1, world_size=1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(previous)
        tuning.apply_cpu_threads(None, world_size=1)  # the environment chose: leave it
        assert torch.get_num_threads() == previous and not (home / "tuning.json").exists()
    finally:
        torch.set_num_threads(previous)


def test_attention_maths_choice_switches_the_cpu_path():
    """bf16 maths is plain bf16 SDPA, bit for bit; fp32 maths is closer to the fp32 reference."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 16, dtype=torch.bfloat16) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    previous = set_cpu_attention_maths("bf16")
    try:
        bf16, _ = packed_attention(module, q, k, v, None)
        set_cpu_attention_maths("fp32")
        fp32, _ = packed_attention(module, q, k, v, None)
    finally:
        set_cpu_attention_maths(previous)
    reference, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(bf16, reference)
    exact, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)
    assert (fp32.float() - exact).abs().max() <= (bf16.float() - exact).abs().max()
    assert not torch.equal(fp32, bf16)
