"""Export (forgetless/export.py, issue #14 item 4): the merged model and the WiSE-FT adapter give the logits of the
in-memory models they were made from (fp32, atol 1e-5), and the WiSE-FT adapter is the exact blend of the updates."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless.export import export_merged, export_wise_ft
from forgetless.lora import delta_weight, lora_modules
from forgetless.methods import wise_ft
from forgetless.models import AdapterError, LoraSettings, attach_lora, load_adapter, load_model, save_adapter
from tests.unit.tiny_model import randomize_lora_b

ATOL = 1e-5


def make_adapter(base: str, folder, seed: int, use_rslora: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA adapter on q/v with random A (seeded) and random B, saved to ``folder``; returns its parameters."""
    model, _ = load_model(base, dtype="fp32")
    torch.manual_seed(seed)
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            use_rslora=use_rslora))
    randomize_lora_b(model, seed=seed + 100, std=0.2)
    save_adapter(model, folder, base)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture
def ids(tiny_model_dir) -> torch.Tensor:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def test_merged_model_gives_the_adapters_logits(tiny_model_dir, tmp_path, ids):
    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)
    in_memory = logits(load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu"), ids)
    plain = logits(load_model(base, dtype="fp32")[0], ids)
    assert float((in_memory - plain).abs().max()) > 1e-2  # the adapter changes the model

    out = export_merged(base, tmp_path / "mu", tmp_path / "merged")
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    merged, tokenizer = load_model(str(out), dtype="fp32")
    assert len(tokenizer) == len(load_model(base)[1])
    torch.testing.assert_close(logits(merged, ids), in_memory, atol=ATOL, rtol=0)


def test_merged_model_keeps_a_bf16_base_in_bf16(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    base16 = tmp_path / "base-bf16"
    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    model.to(torch.bfloat16).save_pretrained(base16)
    tokenizer.save_pretrained(base16)
    make_adapter(str(base16), tmp_path / "mu", seed=1)
    out = export_merged(str(base16), tmp_path / "mu", tmp_path / "merged")

    lora = load_adapter(load_model(str(base16), dtype="fp32")[0], tmp_path / "mu")
    name, module = lora_modules(lora)[0]
    expected = (module.base_layer.weight.float() + delta_weight(module, dtype=torch.float32)).to(torch.bfloat16)
    key = name.removeprefix("base_model.model.") + ".weight"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    # rounded once from the float32 merge (one bf16 ulp for a different summation order)
    assert float((saved[key].float() - expected.float()).abs().max()) <= 2 ** -8 * float(expected.abs().max())
    assert not torch.equal(saved[key], module.base_layer.weight.to(torch.bfloat16))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_wise_ft_adapter_gives_the_blend(tiny_model_dir, tmp_path, ids, alpha, use_rslora):
    base = str(tiny_model_dir)
    nu = make_adapter(base, tmp_path / "nu", seed=2, use_rslora=use_rslora)
    make_adapter(base, tmp_path / "mu", seed=1, use_rslora=use_rslora)
    wise_ft.STATE.save(tmp_path / "general", nu, {})

    model = load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu", trainable=True).eval()
    method = wise_ft.WiseFT(alphas=[alpha])
    method.theta_nu = wise_ft.STATE.load(tmp_path / "general")[0]
    with method.interpolated(model, alpha):  # what the pipeline evaluates as wise-ft(alpha=a)
        in_memory = logits(model, ids)

    out = export_wise_ft(base, tmp_path / "mu", tmp_path / "general", alpha, tmp_path / "wise")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and not config["use_rslora"]
    exported = load_adapter(load_model(base, dtype="fp32")[0], out)
    torch.testing.assert_close(logits(exported, ids), in_memory, atol=ATOL, rtol=0)

    # the closed form: W + (1 - a) dW_nu + a dW_mu written into the base weights
    blend, _ = load_model(base, dtype="fp32")
    mu_model = load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu")
    nu_model = load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "nu")
    with torch.no_grad():
        for (name, m_mu), (_, m_nu) in zip(lora_modules(mu_model), lora_modules(nu_model), strict=True):
            weight = blend.get_submodule(name.removeprefix("base_model.model.")).weight
            nu_update, mu_update = (delta_weight(m, dtype=torch.float32) for m in (m_nu, m_mu))
            weight += (1 - alpha) * nu_update + alpha * mu_update
    torch.testing.assert_close(logits(exported, ids), logits(blend, ids), atol=ATOL, rtol=0)
    if alpha < 1:  # theta_nu matters
        assert float((logits(exported, ids) - logits(mu_model, ids)).abs().max()) > 1e-2


def test_wise_ft_theta_nu_from_a_general_stage_adapter(tiny_model_dir, tmp_path, ids):
    base = str(tiny_model_dir)
    nu = make_adapter(base, tmp_path / "nu", seed=2)
    make_adapter(base, tmp_path / "mu", seed=1)
    wise_ft.STATE.save(tmp_path / "general", nu, {})
    from_file = export_wise_ft(base, tmp_path / "mu", tmp_path / "general" / wise_ft.FILENAME, 0.5, tmp_path / "a")
    from_adapter = export_wise_ft(base, tmp_path / "mu", tmp_path / "nu", 0.5, tmp_path / "b")
    model = load_model(base, dtype="fp32")[0]
    a = logits(load_adapter(model, from_file), ids)
    b = logits(load_adapter(load_model(base, dtype="fp32")[0], from_adapter), ids)
    assert torch.equal(a, b)


def test_export_refuses_a_used_folder_and_a_missing_theta_nu(tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_merged(base, tmp_path / "mu", tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(AdapterError, match="neither a wise-ft theta_nu file"):
        export_wise_ft(base, tmp_path / "mu", tmp_path / "nowhere", 0.5, tmp_path / "wise")
    assert not (tmp_path / "wise").exists() and not (tmp_path / "wise.tmp").exists()


def test_export_command(tiny_model_dir, tmp_path, ids, capsys):
    from forgetless.cli import main

    base = str(tiny_model_dir)
    nu = make_adapter(base, tmp_path / "nu", seed=2)
    make_adapter(base, tmp_path / "mu", seed=1)
    wise_ft.STATE.save(tmp_path / "general", nu, {})
    assert main(["export", "--model", base, "--adapter", str(tmp_path / "mu"), "--output", str(tmp_path / "m")]) == 0
    assert main(["export", "--model", base, "--adapter", str(tmp_path / "mu"), "--output", str(tmp_path / "w"),
                 "--wise-ft", "0.5", "--theta-nu", str(tmp_path / "general")]) == 0
    in_memory = logits(load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu"), ids)
    torch.testing.assert_close(logits(load_model(str(tmp_path / "m"), dtype="fp32")[0], ids), in_memory,
                               atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "w" / "adapter_config.json").read_text())["r"] == 8
    capsys.readouterr()

    for argv, message in (
            (["--output", str(tmp_path / "x"), "--theta-nu", str(tmp_path / "general")], "go together"),
            (["--output", str(tmp_path / "x"), "--wise-ft", "0.5", "--dtype", "bf16"], "written in float32"),
            (["--output", str(tmp_path / "m")], f"error: export: --output: {tmp_path / 'm'} exists and is not an empty"),
            (["--output", str(tmp_path / "x"), "--wise-ft", "0.5", "--theta-nu", str(tmp_path / "no")], "neither")):
        assert main(["export", "--model", base, "--adapter", str(tmp_path / "mu"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("forgetless: error:") and message in err[0], err


def test_an_adapter_on_a_tied_head_is_merged_into_the_head_only(tiny_model_dir, tmp_path, ids):
    """SmolLM2's and Gemma's heads share the input embeddings' weight. Merging an adapter on ``lm_head`` added its
    update to the shared weight, so to the embeddings too: the exported model's logits were off by more than their
    own scale. The adapted head gets its own weight, and the export says the two are no longer tied."""
    base = tmp_path / "tied"
    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    model.config.tie_word_embeddings = True
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    reloaded = load_model(str(base), dtype="fp32")[0]
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    torch.manual_seed(1)
    lora = attach_lora(reloaded, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    randomize_lora_b(lora, seed=2, std=0.2)
    save_adapter(lora, tmp_path / "mu", str(base))
    in_memory = logits(load_adapter(load_model(str(base), dtype="fp32")[0], tmp_path / "mu"), ids)

    out = export_merged(str(base), tmp_path / "mu", tmp_path / "merged")
    merged = load_model(str(out), dtype="fp32")[0]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(merged, ids), in_memory, atol=ATOL, rtol=0)
    plain = load_model(str(base), dtype="fp32")[0]
    torch.testing.assert_close(merged.get_input_embeddings().weight, plain.get_input_embeddings().weight)


def test_an_export_leaves_a_folder_named_like_its_old_temporary_alone(tiny_model_dir, tmp_path):
    """It wrote into OUT.tmp and removed whatever a folder of that name held first."""
    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)
    mine = tmp_path / "merged.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    export_merged(base, tmp_path / "mu", tmp_path / "merged")
    assert (mine / "notes.txt").read_text() == "mine"
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]  # its own temporary is gone


def test_an_export_into_the_current_folder_or_a_link_to_an_empty_one(tiny_model_dir, tmp_path, ids, monkeypatch):
    """`export --output .` failed after the whole merge ('Invalid argument: .') and left the merged copy in a hidden
    folder inside; a link to an empty folder failed the same way (rmdir of a link). Both are filled in place now."""
    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)
    want = logits(load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu"), ids)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert export_merged(base, tmp_path / "mu", ".") == here
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    export_merged(base, tmp_path / "mu", tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    for folder in (here, tmp_path / "target"):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
        torch.testing.assert_close(logits(load_model(str(folder), dtype="fp32")[0], ids), want, atol=ATOL, rtol=0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def failing(folder):  # a write that fails: the empty folder stays empty, no temporary is left
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    from forgetless.export import _write_folder

    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        _write_folder(tmp_path / "empty", failing)
    assert not list((tmp_path / "empty").iterdir()) and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["rank", "targets", "alpha", "rslora"])
def test_a_theta_nu_of_another_lora_layout_is_refused(tiny_model_dir, tmp_path, case):
    """theta_nu's B A was scaled by the domain adapter's s, and a layer theta_nu lacked kept the whole dW_mu: a blend
    of no run (logit errors 0.3-0.5), written without a word. Only an adapter without the domain-start record (made
    elsewhere, or before session 31) could get there."""
    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)  # r 4, alpha 8, q and v
    settings = {"rank": dict(r=2, alpha=8), "targets": dict(target_modules=["q_proj"]), "alpha": dict(alpha=32),
                "rslora": dict(use_rslora=True)}[case]
    model, _ = load_model(base, dtype="fp32")
    torch.manual_seed(2)
    nu_model = attach_lora(model, LoraSettings(**({"r": 4, "alpha": 8, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "v_proj"]} | settings)))
    save_adapter(nu_model, tmp_path / "nu", base)
    nu = {n: p.detach().clone() for n, p in nu_model.named_parameters() if p.requires_grad}
    wise_ft.STATE.save(tmp_path / "general", nu, {})
    said = {"rank": "r: 2 there, 4 in", "targets": r"target_modules: \['q_proj'\] there", "alpha": "lora_alpha: 32",
            "rslora": "use_rslora: True"}[case]
    with pytest.raises(AdapterError, match=f"LoRA settings differ from the adapter's .*{said}"):
        export_wise_ft(base, tmp_path / "mu", tmp_path / "nu", 0.3, tmp_path / "out-folder")
    if case in ("rank", "targets"):  # a theta_nu file keeps no LoRA settings: its shapes and keys tell these two
        with pytest.raises(AdapterError, match="another LoRA rank" if case == "rank" else "theta_nu lacks"):
            export_wise_ft(base, tmp_path / "mu", tmp_path / "general", 0.3, tmp_path / "out-file")
    assert not (tmp_path / "out-folder").exists() and not (tmp_path / "out-file").exists()


def test_an_unreadable_theta_nu_file_is_one_error_without_advice_to_delete_it(tiny_model_dir, tmp_path, capsys):
    from forgetless.cli import main

    base = str(tiny_model_dir)
    make_adapter(base, tmp_path / "mu", seed=1)
    (tmp_path / "general").mkdir()
    (tmp_path / "general" / wise_ft.FILENAME).write_bytes(b"not a safetensors file")
    capsys.readouterr()
    assert main(["export", "--model", base, "--adapter", str(tmp_path / "mu"), "--output", str(tmp_path / "w"),
                 "--wise-ft", "0.5", "--theta-nu", str(tmp_path / "general")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable wise-ft theta_nu file" in err[0] and "delete" not in err[0], err


@pytest.mark.parametrize("extra", [{"modules_to_save": ["embed_tokens"]}, {"target_modules": ["q_proj", "embed_tokens"]}])
def test_the_base_fingerprint_ignores_a_trained_embedding(tiny_model_dir, tmp_path, ids, extra):
    """An adapter that trains the embedding (modules_to_save, or LoRA on it) recorded the trained rows as its base's
    fingerprint, and forgetless then refused its own adapter ('trained on another base model')."""
    from peft import LoraConfig, get_peft_model

    from forgetless.models import base_fingerprint

    base = str(tiny_model_dir)
    before = base_fingerprint(load_model(base, dtype="fp32")[0])
    model = get_peft_model(load_model(base, dtype="fp32")[0],
                           LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} | extra)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert base_fingerprint(model) == before
    save_adapter(model, tmp_path / "mu", base)
    want = logits(model, ids)
    torch.testing.assert_close(logits(load_adapter(load_model(base, dtype="fp32")[0], tmp_path / "mu"), ids), want,
                               atol=ATOL, rtol=0)
