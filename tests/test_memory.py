"""What the model needs in memory, and the loader's choices on a GPU (device map, dtype, refusing early), on CPU."""

import json
import logging

import pytest
import torch
from transformers import CLIPVisionModel

from flexattn import cli, loading, memory
from flexattn.loading import ModelLoadError
from flexattn.modeling import FlexLlavaForConditionalGeneration
from flexattn.pipeline import FlexVLM
from flexattn.presets import llava_7b_config, tiny_config
from flexattn.settings import FlexSettings

from .conftest import make_vlm, random_image, write_released_checkpoint, write_transformers_checkpoint

GB = 10**9
QUESTION = "what letter is on the red circle ?"


@pytest.fixture(scope="module")
def source():
    return make_vlm(seed=4, num_layers=4, selection_layer=1, lowres_size=56, threshold=80)


@pytest.fixture(scope="module")
def needs_7b():
    config = llava_7b_config()
    return memory.needs(config, FlexSettings.from_dict(config.flex_attention), torch.float16)


# ---- what the model needs --------------------------------------------------------------------------------------
def test_parameters_are_counted_exactly(source, needs_7b):
    counts = memory.count_parameters(tiny_config(num_layers=4, selection_layer=1, lowres_size=56))
    assert sum(counts.values()) == sum(p.numel() for p in source.model.parameters())
    text = source.model.config.text_config
    kv_dim = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    assert counts["hr_projections"] == 4 * 2 * text.hidden_size * kv_dim  # k/v_proj_hd per layer, no bias
    # the released 7B: LLaMA-7B, one k/v_proj_hd pair of 4096 x 4096 per layer, CLIP ViT-L/14-336's vision model
    p = needs_7b.parameters
    assert p["language"] == 6_738_415_616 and p["hr_projections"] == 32 * 2 * 4096 * 4096
    assert p["vision"] == 303_507_456 and p["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert round(needs_7b.weights / GB, 1) == 16.3 and needs_7b.weights == 2 * needs_7b.total_parameters


def test_image_cache_bytes_are_what_an_image_holds(source):
    """The budget's per-image figure is the bytes a select_all answer really leaves with the image."""
    vlm = make_vlm(seed=4, num_layers=4, selection_layer=1, lowres_size=56, threshold=80)
    image = random_image(70, 50, seed=1)
    got = vlm.answer(image, QUESTION, mode="select_all", max_new_tokens=3)
    prepared = vlm.prepare(image)
    per_image = memory.image_cache_bytes(vlm.model.config, vlm.settings, vlm.model.dtype)
    assert prepared.nbytes == per_image.worst(got.stats.prompt_tokens) > 0
    # the prompt prefix is stored compactly: no storage of the generated tokens' keys/values kept behind it
    for keys, values in prepared.prompt_cache[1]:
        assert keys.shape[-2] == got.stats.prompt_tokens - 1
        assert keys.untyped_storage().nbytes() == keys.nbytes and values.untyped_storage().nbytes() == values.nbytes


def test_cache_budget_from_free_memory_7b(needs_7b):
    """On a 24 GB card the 7B's image cache holds one image; on 40 GB and up, four (the count limit)."""
    image = needs_7b.image
    assert 2.3 * GB < image < 2.5 * GB  # 23 layers x 85 MB of HR keys/values, features, a 703-token prefix
    after_weights = {card: gb * GB - memory.CUDA_CONTEXT_BYTES - needs_7b.weights for card, gb in
                     {"A10G": 24, "A100 40GB": 40, "H100": 80}.items()}
    kept = {card: memory.images_that_fit(memory.image_cache_budget(free), image, 4) for card, free in
            after_weights.items()}
    assert kept == {"A10G": 1, "A100 40GB": 4, "H100": 4}
    assert memory.image_cache_budget(10 * GB) == 5 * GB
    assert memory.images_that_fit(0, image, 4) == 1  # the image being asked about is always kept


def test_fit_problems_are_one_line(needs_7b):
    t4 = memory.fit_problem(needs_7b, torch.device("cuda:0"), 15 * GB, None, on_host=False)
    assert "16.3 GB of weights" in t4 and "15.0 GB free" in t4 and "\n" not in t4
    assert memory.fit_problem(needs_7b, torch.device("cuda:0"), 23 * GB, None, on_host=False) is None
    # a 15 GB host (Spaces' t4-small / a10g-small) cannot hold the weights when they pass through it whole
    host = memory.fit_problem(needs_7b, torch.device("cuda:0"), 23 * GB, 15 * GB, on_host=True)
    assert "host RAM" in host and "16.3 GB" in host
    assert memory.fit_problem(needs_7b, torch.device("cuda:0"), 23 * GB, 15 * GB, on_host=False) is None


def test_available_host_bytes_reads_meminfo_and_cgroup_limits(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("16000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert memory.available_host_bytes(tmp_path / "meminfo", cgroup) == 15 * GB  # the container's limit wins
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_host_bytes(tmp_path / "meminfo", cgroup) == 20000000 * 1024
    assert memory.available_host_bytes(tmp_path / "none", tmp_path / "none") is None


def test_memory_command_prints_needs_and_cards(capsys):
    assert cli.main(["memory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["needs"]["float16"]["weights"] == 2 * sum(out["needs"]["float16"]["parameters"].values())
    rows = {(r["card"], r["dtype"]): r for r in out["cards"]}
    assert not rows[("T4", "float16")]["fits"] and rows[("A10G", "float16")]["cached_images"] == 1
    assert cli.main(["memory", "--dtypes", "float8"]) == 2


# ---- dtype -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,capability,expected", [
    ("released", (7, 5), torch.float16),  # T4
    ("released", (8, 0), torch.float16),  # the authors deploy the released checkpoint in float16
    ("released", (9, 0), torch.float16),
    ("transformers", (7, 0), torch.float16),  # V100: bfloat16 would be emulated
    ("transformers", (7, 5), torch.float16),
    ("transformers", (8, 6), torch.bfloat16),  # A10G
    ("transformers", (12, 0), torch.bfloat16),
])
def test_dtype_for_a_compute_capability(layout, capability, expected):
    assert loading.default_dtype(torch.device("cuda:0"), layout, capability) == expected
    assert loading.default_dtype(torch.device("cpu"), layout, capability) == torch.float32


def test_explicit_dtype_wins_with_a_warning_where_emulated(caplog):
    cuda = torch.device("cuda:0")
    with caplog.at_level(logging.WARNING, logger="flexattn.loading"):
        assert loading.choose_dtype(cuda, "released", torch.bfloat16, capability=(7, 5)) == torch.bfloat16
    assert "emulated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexattn.loading"):
        assert loading.choose_dtype(cuda, "released", torch.bfloat16, capability=(8, 0)) == torch.bfloat16
        assert loading.choose_dtype(cuda, "released", torch.float32, capability=(7, 5)) == torch.float32
    assert caplog.text == ""


# ---- loading onto a GPU, simulated -------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine that says it has an Ampere GPU with `free` bytes; from_pretrained calls are recorded and load on
    the CPU (there is no GPU), and `.to` calls are recorded."""
    seen = {"model": [], "clip": [], "to": [], "free": 24 * GB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: seen["free"])
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    model_load = FlexLlavaForConditionalGeneration.from_pretrained.__func__
    clip_load = CLIPVisionModel.from_pretrained.__func__

    def recording(load, key):
        def from_pretrained(cls, *args, **kwargs):
            seen[key].append(kwargs)
            return load(cls, *args, **{**kwargs, "device_map": None})
        return classmethod(from_pretrained)

    monkeypatch.setattr(FlexLlavaForConditionalGeneration, "from_pretrained", recording(model_load, "model"))
    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", recording(clip_load, "clip"))
    monkeypatch.setattr(FlexLlavaForConditionalGeneration, "to",
                        lambda self, *args, **kwargs: seen["to"].append(args) or self)
    return seen


def test_weights_load_straight_to_the_gpu(source, tmp_path, fake_gpu):
    released = write_released_checkpoint(source, tmp_path / "released", tower_inside=False)
    loaded = loading.load(released, device="cuda:0")
    assert [k["device_map"] for k in fake_gpu["model"]] == ["cuda:0"]
    assert [k["device_map"] for k in fake_gpu["clip"]] == ["cuda:0"]  # the separate CLIP load too
    assert fake_gpu["model"][0]["dtype"] == torch.float16 == fake_gpu["clip"][0]["dtype"]  # released: fp16
    assert fake_gpu["to"] == []  # already there: no second copy through the host
    assert loaded.needs.weights == 2 * sum(p.numel() for p in source.model.parameters())
    native = write_transformers_checkpoint(source, tmp_path / "native")
    loading.load(native, device="cuda:0")
    assert fake_gpu["model"][1]["device_map"] == "cuda:0" and fake_gpu["model"][1]["dtype"] == torch.bfloat16


def test_zerogpu_loads_on_the_cpu_then_moves(source, tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: pytest.fail("no GPU outside a GPU call"))
    path = write_transformers_checkpoint(source, tmp_path / "native")
    loading.load(path, device="cuda")
    assert fake_gpu["model"][0]["device_map"] is None and fake_gpu["to"] == [(torch.device("cuda"),)]


def test_a_model_that_cannot_fit_is_refused_before_loading(source, tmp_path, fake_gpu):
    path = write_transformers_checkpoint(source, tmp_path / "native")
    fake_gpu["free"] = 1000
    with pytest.raises(ModelLoadError, match="GPU memory") as err:
        loading.load(path, device="cuda:0")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert fake_gpu["model"] == []  # refused before any weight was read


def test_cuda_requested_without_a_gpu_is_one_line(source, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_transformers_checkpoint(source, tmp_path / "native")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        FlexVLM.load(path, device="cuda")
