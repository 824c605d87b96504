"""EWC-LoRA on tiny models: the Fisher (both estimators) against an independent per-example computation, the
penalty and its gradient, anchors, the stage flow, persistence and the registry; on every device."""

import copy

import pytest
import torch

from forgetless.lora import lora_modules
from forgetless.methods import REGISTRY, general_stage_entries, resolve
from forgetless.methods.ewc import EWC, FILENAME, example_generator, fisher_diagonal, load_fisher
from forgetless.methods.hlora import HLoRA
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.gradcheck import central_differences
from tests.unit.tiny_model import fused_and_plain, random_examples, randomize_lora_b


def ragged_examples():
    """Different lengths (so batches are padded) and prompt tokens without a loss."""
    out = []
    for i, ex in enumerate(random_examples(7, 9, seed=3, prompt=2)):
        n = 9 - (i % 4)
        out.append({"input_ids": ex["input_ids"][:n], "labels": ex["labels"][:n]})
    return out


def reference_fisher(model, examples, estimator, seed):
    """Independently: merge the adapter, then loop over examples with autograd on each merged weight W."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in lora_modules(model)]
    weights = [merged.get_submodule(n.removeprefix("base_model.model.")).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros_like(w) for w in weights]
    device = weights[0].device
    tokens = 0
    for index, ex in enumerate(examples):
        g = example_generator(seed, index, device)  # as fisher_diagonal samples: one per example, on the model's device
        ids = torch.tensor([ex["input_ids"]], device=device)
        labels = torch.tensor(ex["labels"], device=device)
        logits = merged(input_ids=ids).logits[0]
        keep = labels[1:] != -100
        logp = torch.log_softmax(logits[:-1][keep], dim=-1)
        if estimator == "sampled":
            y = torch.multinomial(logp.detach().exp(), 1, generator=g).squeeze(1)
        else:
            y = labels[1:][keep]
        nll = -sum(logp[i, y[i]] for i in range(len(y)))  # summed NLL of this one example
        tokens += len(y)
        grads = torch.autograd.grad(nll, weights)
        for f, gr in zip(fisher, grads):
            f += gr**2  # the square of *this example's* gradient
    return {f"{n}.base_layer.weight": f / tokens for n, f in zip(names, fisher)}, tokens


# ---------------------------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_fisher_matches_independent_per_example_computation(estimator, lora_model, tol):
    model = lora_model(dtype=torch.float64, b_std=0.05)  # a non-zero adapter: the Fisher is taken at W + dW
    examples = ragged_examples()
    got, tokens = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=5)
    want, want_tokens = reference_fisher(model, examples, estimator, seed=5)
    assert tokens == want_tokens == sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().max() > 0
        assert torch.allclose(got[name], want[name], rtol=tol(1e-9, torch.float64), atol=1e-18), name
    assert all(p.grad is None for p in model.parameters())  # computing the Fisher leaves .grad alone


def test_estimators_differ_and_batch_size_does_not_matter(lora_model, tol):
    model = lora_model(dtype=torch.float64)
    examples = ragged_examples()
    sampled, _ = fisher_diagonal(model, examples, "sampled", batch_size=2, seed=1)
    sampled4, _ = fisher_diagonal(model, examples, "sampled", batch_size=4, seed=1)
    empirical, _ = fisher_diagonal(model, examples, "empirical", batch_size=2)
    for k in sampled:
        assert torch.allclose(sampled[k], sampled4[k], rtol=tol(1e-10, torch.float64), atol=0)
        assert not torch.allclose(sampled[k], empirical[k])
    # one padded batch of all examples gives the same per-example Fisher
    one_batch, _ = fisher_diagonal(model, examples, "empirical", batch_size=len(examples))
    for k in empirical:
        assert torch.allclose(one_batch[k], empirical[k], rtol=tol(1e-10, torch.float64), atol=0)


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_fisher_over_all_weights_agrees_on_lora_bases_and_covers_the_rest(estimator, lora_model, tol):
    model = lora_model(dtype=torch.float64, b_std=0.05)
    examples = ragged_examples()
    lora, _ = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=2)
    full, _ = fisher_diagonal(model, examples, estimator, "all", seed=2)
    assert set(lora) < set(full)
    for k in lora:
        assert torch.allclose(full[k], lora[k], rtol=tol(1e-9, torch.float64), atol=1e-18), k
    assert "base_model.model.model.embed_tokens.weight" in full  # tied with the head: autograd sums both uses
    assert full["base_model.model.model.embed_tokens.weight"].abs().sum() > 0
    assert not any("lora_" in k for k in full)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # restored


# --------------------------------------------------------------------------------------------- penalty
@pytest.fixture
def domain_ready(lora_model, make_ctx):
    """``domain_ready(anchor="general", lam=1.0)``: a float64 model, an EWC plugin whose general stage has recorded
    the Fisher (hooks driven by hand), and the domain stage's context after its start; and the general one."""

    def build(anchor="general", lam=1.0):
        model = lora_model(dtype=torch.float64)
        plugin = EWC(lam=lam, anchor=anchor, samples=5, batch_size=2)
        examples = random_examples(6, 8)
        ctx = make_ctx("general", model)
        plugin.prepare_examples(ctx, examples)
        randomize_lora_b(model, seed=4)  # as if the general stage had trained the adapter
        plugin.on_stage_end(ctx)
        dctx = make_ctx("domain", model)
        plugin.on_stage_start(dctx)
        return model, plugin, dctx, ctx

    return build


def test_penalty_value_anchor_and_gradient_matches_central_differences(domain_ready, tol):
    model, plugin, dctx, _ = domain_ready(anchor="general")
    assert plugin.penalty().item() == 0.0  # anchored at the adapter the domain stage starts from
    ref = {n: (m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]).detach().clone()
           for n, m in lora_modules(model)}
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A["default"].weight.add_(0.05 * torch.randn_like(m.lora_A["default"].weight))
            m.lora_B["default"].weight.add_(0.05 * torch.randn_like(m.lora_B["default"].weight))
    expected = sum((plugin.fisher[f"{n}.base_layer.weight"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight
                    * m.scaling["default"] - ref[n]) ** 2).sum() for n, m in lora_modules(model))
    pen = plugin.penalty()
    assert pen > 0 and torch.allclose(pen, expected, rtol=tol(1e-12, torch.float64))
    params = [p for _, m in lora_modules(model) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    grads = torch.autograd.grad(pen, params)
    grad_of = dict(zip(map(id, params), grads))
    # the penalty is quadratic in any single entry of A or B: central differences are exact for any h, up to the
    # rounding of the two penalties they subtract (about eps |penalty| / h; the sums' order differs on a GPU)
    h = 1e-2
    rounding = 4 * torch.finfo(torch.float64).eps * float(pen) / h
    for p, idx, fd in central_differences(plugin.penalty, params, h=h):
        grad = grad_of[id(p)]
        bound = tol(1e-8, torch.float64) * max(abs(fd), 1e-3 * float(grad.abs().max())) + rounding
        assert abs(fd - grad[idx].item()) <= bound, (idx, fd)
    extra = plugin.extra_loss(dctx, {})
    assert torch.allclose(extra, plugin.lam * plugin.penalty())
    assert float(dctx.scalars["ewc_penalty"]) == pytest.approx(float(pen.detach()))


def test_anchor_zero_pulls_the_whole_update(domain_ready, tol):
    model, plugin, _, _ = domain_ready(anchor="zero")
    expected = sum((plugin.fisher[f"{n}.base_layer.weight"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight
                    * m.scaling["default"]) ** 2).sum() for n, m in lora_modules(model))
    assert plugin.penalty() > 0 and torch.allclose(plugin.penalty(), expected, rtol=tol(1e-12, torch.float64))


def test_general_then_domain_with_the_training_loop_records_cost(lora_model, accelerator, examples):
    model = lora_model()
    plugin, = resolve({"name": "ewc", "lambda": 100.0, "samples": 4}).plugins
    assert plugin.lam == 100.0
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32", progress=False)
    general = train_stage(model, examples, cfg, [plugin], stage="general", accelerator=accelerator)
    cost = general.extras["importance_cost"]["ewc"]
    assert cost["examples"] == 4 and cost["tokens"] == 4 * 7 and cost["seconds"] > 0
    assert cost["bytes"] == sum(t.numel() * 4 for t in plugin.fisher.values())
    domain = train_stage(model, random_examples(8, 8, seed=5), TrainConfig(max_steps=3, batch_size=4, lr=1e-2,
                                                                             precision="fp32", progress=False),
                         [plugin], stage="domain", accelerator=accelerator)
    assert domain.history[0]["ewc_penalty"] == 0.0
    assert domain.history[-1]["ewc_penalty"] > 0
    assert domain.history[-1]["ewc_penalty_scaled"] == pytest.approx(100 * domain.history[-1]["ewc_penalty"], rel=1e-5)


def test_without_a_general_stage_the_fisher_is_taken_at_the_domain_start(lora_model, accelerator, make_ctx):
    recipe = resolve(["lora-mu", "ewc"])
    assert recipe.stages == ("domain",)
    plugin, = recipe.plugins
    model = lora_model()
    general = random_examples(6, 8, seed=9)
    res = train_stage(model, random_examples(8, 8), TrainConfig(max_steps=2, batch_size=4, lr=1e-2, precision="fp32",
                                                                 progress=False),
                      [plugin], stage="domain", general_examples=general, accelerator=accelerator)
    assert res.extras["importance_cost"]["ewc"]["examples"] == 6
    assert res.history[0]["ewc_penalty"] == 0.0 and res.history[-1]["ewc_penalty"] > 0  # B = 0: anchored at zero
    with pytest.raises(ValueError, match="general"):
        EWC().on_stage_start(make_ctx("domain", lora_model()))


def test_a_folder_without_a_fisher_is_named(tmp_path, lora_model, make_ctx):
    """load_state() of a folder without the Fisher file (mistyped, or a stage trained without EWC) then a domain
    stage without general text said "load_state() a folder with ewc_fisher.safetensors", not which folder it had."""
    plugin = EWC()
    plugin.load_state(tmp_path / "general-stage")
    with pytest.raises(ValueError, match=f"EWC needs a Fisher \\({tmp_path / 'general-stage'} has no "
                                         f"ewc_fisher.safetensors"):
        plugin.on_stage_start(make_ctx("domain", lora_model()))


# ----------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_and_bfloat16_storage(tmp_path, capsys, domain_ready, make_ctx, tol):
    model, plugin, _, gctx = domain_ready()
    plugin.save_state(tmp_path / "f32")
    out = capsys.readouterr().out
    assert "EWC Fisher:" in out and "MiB" in out
    loaded = load_fisher(tmp_path / "f32")
    assert loaded["metadata"]["estimator"] == "sampled" and loaded["metadata"]["examples"] == 5
    for k, t in plugin.fisher.items():
        assert torch.equal(loaded["fisher"][k], t.float().cpu())
    assert gctx.extras["importance_cost"]["ewc"]["bytes"] == sum(t.numel() * 4 for t in plugin.fisher.values())
    plugin.storage_dtype = "bfloat16"
    plugin.save_state(tmp_path / "bf16")
    assert (tmp_path / "bf16" / FILENAME).stat().st_size < 0.6 * (tmp_path / "f32" / FILENAME).stat().st_size

    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A["default"].weight.add_(0.1)
    before = plugin.penalty()
    fresh = EWC()
    fresh.load_state(tmp_path / "f32")
    fresh.on_stage_start(make_ctx("domain", model))  # anchors at the adapter as it is now
    assert fresh.penalty().item() == 0.0
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A["default"].weight.sub_(0.1)
    assert torch.allclose(fresh.penalty(), before, rtol=tol(1e-6))  # float32 storage of a float64 Fisher
    fresh.save_state(tmp_path / "copy")  # a loaded, untouched state is copied as is
    assert (tmp_path / "copy" / FILENAME).read_bytes() == (tmp_path / "f32" / FILENAME).read_bytes()


def test_load_into_mismatched_model_names_the_module(tmp_path, domain_ready, lora_model, make_ctx):
    _, plugin, _, _ = domain_ready()
    plugin.save_state(tmp_path)
    other = lora_model(dtype=torch.float64, targets=("q_proj", "k_proj"))
    fresh = EWC()
    fresh.load_state(tmp_path)
    with pytest.raises(ValueError, match=r"k_proj"):
        fresh.on_stage_start(make_ctx("domain", other))
    # a cached general stage trained without EWC (lora-nu-mu's) has no Fisher file: nothing is remembered, and the
    # Fisher is computed when the domain stage starts (tests/unit/test_experiment.py: the same numbers)
    shared = EWC()
    shared.load_state(tmp_path / "nowhere")
    assert shared._state.path is None and shared.fisher == {}


# -------------------------------------------------------------------------------------------- registry
def test_options_and_registry():
    with pytest.raises(ValueError, match="estimator"):
        resolve({"name": "ewc", "estimator": "exact"})
    with pytest.raises(ValueError, match="bad options"):
        resolve({"name": "ewc", "lambda": 1.0, "lam": 2.0})
    with pytest.raises(ValueError):
        EWC(anchor="somewhere")
    with pytest.raises(ValueError):
        EWC(fisher_over="some")
    assert resolve("ewc").stages == ("general", "domain")
    # the regularization weights the report sweeps are the plugins' defaults
    assert REGISTRY["ewc"].weight_option == ("lambda", EWC().lam)
    assert REGISTRY["hlora"].weight_option == ("phi", HLoRA().phi)
    # EWC trains the general stage as lora-nu-mu does and only reads its Fisher off it: every ewc run shares
    # lora-nu-mu's cached general stage, whatever its options (a saved Fisher of other Fisher options is not used)
    a = general_stage_entries(resolve({"name": "ewc", "lambda": 10, "samples": 8}).entries)
    c = general_stage_entries(resolve({"name": "ewc", "estimator": "empirical"}).entries)
    assert a == c == general_stage_entries(resolve("lora-nu-mu").entries) == [{"name": "lora-nu-mu"}]
    assert general_stage_entries(resolve({"name": "hlora", "phi": 0.1}).entries) == [{"name": "hlora"}]


# ------------------------------------------------------------------------- fused per-step work (issue #15)
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("anchor,offload", [("general", "none"), ("zero", "none"), ("general", "cpu")])
def test_fused_penalty_and_gradient_equal_the_plain_loop(lora_model, make_ctx, tol, anchor, offload):
    """fp32, all seven projections (several groups of equal shapes): the grouped penalty (weighted_distance) and its gradient
    are the module-by-module ones."""
    model = lora_model(targets=ALL_SEVEN, b_std=0.05)
    plugin = EWC(samples=4, anchor=anchor, offload=offload)
    general = make_ctx("general", model)
    plugin.prepare_examples(general, random_examples(4, 8))
    plugin.on_stage_end(general)
    plugin.on_stage_start(make_ctx("domain", model))
    assert len(plugin._terms) >= 3
    randomize_lora_b(model, seed=7, std=0.05)  # the domain stage moved the adapter away from the anchor
    params = [p for _, m in lora_modules(model) for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    (fused_pen, fused_grads), (plain_pen, plain_grads) = fused_and_plain(plugin, plugin.penalty, params)
    assert plain_pen.dtype == torch.float32 and plain_pen > 0
    assert abs(float(fused_pen - plain_pen)) <= tol(1e-6) * float(plain_pen)
    for a, b in zip(fused_grads, plain_grads):
        assert float((a - b).abs().max()) <= tol(1e-6) * float(b.abs().max())


def test_penalty_step_reads_nothing_from_the_device(lora_model, make_ctx):
    from tests.unit.test_hlora import no_host_reads

    model = lora_model(targets=ALL_SEVEN, b_std=0.05)
    plugin = EWC(samples=4)
    general = make_ctx("general", model)
    plugin.prepare_examples(general, random_examples(4, 8))
    plugin.on_stage_end(general)
    ctx = make_ctx("domain", model)
    plugin.on_stage_start(ctx)
    with no_host_reads():
        extra = plugin.extra_loss(ctx, {})
        plugin.before_optimizer_step(ctx)
        plugin.after_optimizer_step(ctx)
    extra.backward()
    assert isinstance(ctx.scalars["ewc_penalty"], torch.Tensor) and not ctx.scalars["ewc_penalty"].requires_grad


# ------------------------------------------------------------------------------- the Fisher's NLL in one pass
@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_batch_nll_is_the_per_example_sum_with_the_same_draws_and_gradient(estimator, lora_model):
    from forgetless.methods.ewc import _batch_nll, rowwise_batch_nll
    from forgetless.training.batches import collate

    model = lora_model(b_std=0.05).eval()  # fp32
    batch = collate(ragged_examples()[:4], pad_token_id=0)
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits.detach().requires_grad_(True)
    labels, keep = batch["labels"].to(device), batch["labels"][:, 1:] != -100
    old_gen = torch.Generator(device=device).manual_seed(3)
    new_gen = torch.Generator(device=device).manual_seed(3)
    old = rowwise_batch_nll(logits, labels, keep, estimator, old_gen)
    new = _batch_nll(logits, labels, keep, estimator, new_gen)
    assert torch.equal(old_gen.get_state(), new_gen.get_state())  # the generator was used as before
    assert abs(float(new - old)) <= 1e-6 * abs(float(old))  # the same terms, summed in another order
    old_grad, = torch.autograd.grad(old, logits)
    new_grad, = torch.autograd.grad(new, logits)
    assert torch.equal(new_grad, old_grad)  # what the hooks see: the Fisher is the same


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_fisher_is_the_per_example_loops(estimator, lora_model, monkeypatch):
    """fp32: the Fisher with the one-pass NLL equals the one computed with the per-example loop, bit for bit."""
    from forgetless.methods import ewc

    model = lora_model(b_std=0.05, targets=ALL_SEVEN)
    examples = ragged_examples()
    new, new_tokens = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=5)
    monkeypatch.setattr(ewc, "_batch_nll", ewc.rowwise_batch_nll)
    old, old_tokens = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=5)
    assert new_tokens == old_tokens
    for name, f in old.items():
        assert f.dtype == torch.float32 and f.abs().max() > 0
        assert torch.equal(new[name], f), name


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_logits_go_a_chunk_of_examples_at_a_time_with_the_same_fisher(estimator, dtype, lora_model, monkeypatch,
                                                                            tol):
    """Above the training loss's logits threshold (4 x 1024 x 128k at 8B) the head and the NLL run one chunk of whole
    examples at a time: the same draws and the same Fisher as the whole batch's logits (against the independent
    per-example computation too), and no logits tensor larger than one chunk's. float64 shows the paths are the same
    function; float32, what runs, that they agree to its rounding."""
    from forgetless.training import loss

    model = lora_model(dtype=dtype, b_std=0.05)
    examples = ragged_examples()
    whole, tokens = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=5)
    head = model.get_output_embeddings()
    shapes = []
    hook = head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    vocab, longest = head.out_features, max(len(e["input_ids"]) for e in examples)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 2 * longest * vocab)  # two examples per chunk, batches of three
    try:
        chunked, chunked_tokens = fisher_diagonal(model, examples, estimator, "lora", batch_size=3, seed=5)
    finally:
        hook.remove()
    assert chunked_tokens == tokens
    assert shapes and max(s[0] for s in shapes) == 2 and any(s[0] == 1 for s in shapes)  # chunks of 2, then the rest
    want, _ = reference_fisher(model, examples, estimator, seed=5)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-6}[dtype]  # (float32 on this CPU: equal, 2.6e-6 to the reference)
    for name, f in whole.items():
        assert f.abs().max() > 0
        assert torch.allclose(chunked[name], f, rtol=tol(rtol, dtype), atol=0), name
        assert torch.allclose(chunked[name], want[name], rtol=tol(10 * rtol, dtype),
                              atol=1e-18 if dtype == torch.float64 else 1e-9 * float(f.abs().max())), name
    assert all(p.grad is None for p in model.parameters())


def test_fisher_precision_run_takes_the_runs_autocast(lora_model, make_ctx):
    """``fisher_precision: run`` computes the Fisher under the run's precision: under bf16 it is the float32 Fisher up
    to bf16 rounding (close, not equal); the default stays float32 whatever the run's precision."""
    model = lora_model(b_std=0.05, targets=ALL_SEVEN)
    examples = ragged_examples()
    exact, _ = fisher_diagonal(model, examples, "empirical", "lora", batch_size=3)
    rounded, _ = fisher_diagonal(model, examples, "empirical", "lora", batch_size=3, precision="bf16")
    for name, f in exact.items():
        assert rounded[name].dtype == torch.float32 and not torch.equal(rounded[name], f), name  # autocast acted
        assert float((rounded[name] - f).norm() / f.norm()) < 0.05, name  # ... and only rounded
    # through the method: the run's precision is bf16; the default Fisher ignores it, ``run`` takes it
    for choice, want in (("float32", exact), ("run", rounded)):
        plugin = EWC(estimator="empirical", batch_size=3, fisher_precision=choice)
        ctx = make_ctx("general", model)
        ctx.config.precision = "bf16"
        plugin._compute(ctx, examples)
        assert plugin.metadata["options"]["fisher_precision"] == choice
        for name in want:
            assert torch.equal(plugin.fisher[name], want[name]), (choice, name)
    with pytest.raises(ValueError, match="fisher_precision"):
        EWC(fisher_precision="bf16")


def test_a_saved_fisher_without_fisher_precision_counts_as_float32():
    plugin = EWC()
    saved = {"options": {k: v for k, v in plugin.options.as_dict().items() if k != "fisher_precision"}}
    assert plugin._fits(saved)
    assert not EWC(fisher_precision="run")._fits(saved)


def test_a_model_that_rescales_its_logits_keeps_the_whole_logits_fisher(monkeypatch):
    """Granite divides its logits by logits_scaling after the head: the chunked path (backbone + bare head) would draw
    from and differentiate the wrong distribution, so the probe sends it to the whole-logits path, whatever the
    threshold says: the same Fisher as without chunking."""
    from forgetless.models import LoraSettings, attach_lora
    from forgetless.training import loss
    from tests.unit.test_chunked_ce import _tiny_granite

    model = attach_lora(_tiny_granite(0.05), LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    examples = random_examples(6, 10, vocab_size=64, seed=2)
    want, _ = fisher_diagonal(model, examples, "sampled", "lora", batch_size=3, seed=5)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 1)
    got, _ = fisher_diagonal(model, examples, "sampled", "lora", batch_size=3, seed=5)
    for name, f in want.items():
        assert f.abs().max() > 0 and torch.equal(got[name], f), name


def test_a_module_called_on_flattened_tokens_gets_per_example_gradients():
    """Qwen2-MoE calls its shared expert on ``hidden.view(-1, H)``: the hooks see [examples x positions, features],
    and taking each row for an example gave sum_t (g_t x_t^T)^2 instead of (sum_t g_t x_t^T)^2 (rel. error 0.52
    against the per-example reference). They are unflattened to the batch's examples now."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                            pad_token_id=0, tie_word_embeddings=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "shared_expert.up_proj"],
                      init_lora_weights=False)  # B != 0: a non-trivial adapter
    model = get_peft_model(Qwen2MoeForCausalLM(config), lora)  # float32: the routed experts' grouped matmul
    examples = ragged_examples()
    fisher, tokens = fisher_diagonal(model, examples, "empirical", "lora", batch_size=3)
    want, want_tokens = reference_fisher(model, examples, "empirical", seed=0)
    assert tokens == want_tokens and any("shared_expert.up_proj" in name for name in fisher)
    for name, f in want.items():
        assert f.abs().max() > 0
        assert torch.allclose(fisher[name], f, rtol=1e-4, atol=1e-6 * float(f.abs().max())), name


def test_each_examples_draws_are_its_own_whatever_the_share(lora_model):
    """Under several processes each computes the Fisher of every world-th example. One generator drawing for the
    examples in order gave two processes other labels than one (rank 1's k-th example drew rank 0's k-th numbers):
    the sampled Fisher depended on the process count (1.14 relative, 8 examples), and a kept Fisher was shared
    between such runs. Each example now draws from its own generator: the shares' sums are the whole's."""
    model = lora_model(dtype=torch.float64, b_std=0.05)
    examples = ragged_examples()
    whole, tokens = fisher_diagonal(model, examples, "sampled", batch_size=3, seed=5)
    shares = [fisher_diagonal(model, examples[r::2], "sampled", batch_size=2, seed=5,
                              example_ids=range(r, len(examples), 2)) for r in (0, 1)]
    assert sum(t for _, t in shares) == tokens
    for name, f in whole.items():
        summed = sum(share[name] * t for share, t in shares) / tokens
        torch.testing.assert_close(summed, f, rtol=1e-10, atol=1e-18)
    # the draws matter: the shares without their places draw other labels
    other, _ = fisher_diagonal(model, examples[1::2], "sampled", batch_size=2, seed=5)
    assert any(not torch.allclose(other[k], shares[1][0][k]) for k in other)


def test_a_process_without_a_share_of_the_fishers_examples_joins_the_sum(lora_model, monkeypatch):
    """With fewer examples than processes one process gets none. It raised "EWC needs general-text examples" while
    the others waited in the all-reduce (gloo: 'Connection closed by peer'; NCCL: a hang until the timeout). It now
    adds zeros to the sum; a Fisher with no labelled token anywhere is an error on every process alike."""
    from forgetless.methods import ewc

    model = lora_model(dtype=torch.float64, b_std=0.05)
    examples = ragged_examples()[:1]
    theirs, tokens = fisher_diagonal(model, examples, "sampled", batch_size=2, seed=5)  # rank 0's share: all
    monkeypatch.setattr(ewc, "world_size", lambda: 2)

    def reduce_with_rank0(tensors, op="sum"):  # what the all-reduce adds: rank 0's sums and token count
        sums = [f * tokens for f in theirs.values()] + [torch.tensor(float(tokens), dtype=torch.float64)]
        for t, other in zip(tensors, sums, strict=True):
            t.add_(other.to(t.device, t.dtype))

    monkeypatch.setattr(ewc, "all_reduce_", reduce_with_rank0)
    mine, count = fisher_diagonal(model, [], "sampled", batch_size=2, seed=5, example_ids=[])
    assert count == tokens
    for name, f in theirs.items():
        torch.testing.assert_close(mine[name], f)
    monkeypatch.setattr(ewc, "all_reduce_", lambda tensors, op="sum": None)
    with pytest.raises(ValueError, match="none of its examples has a labelled token"):
        fisher_diagonal(model, [], "sampled", batch_size=2, seed=5, example_ids=[])


def test_a_share_given_without_its_places_is_taken_as_shard_cuts_it(lora_model, monkeypatch):
    """fisher_diagonal called by hand under several processes, each with its share and no example_ids: the k-th
    example of every process drew the same labels (the old bug, by another door). Without ids a share is now taken
    as methods.common.shard cuts it: every world-th example from the process's rank."""
    from forgetless.methods import ewc

    model = lora_model(dtype=torch.float64, b_std=0.05)
    examples = ragged_examples()
    placed, _ = fisher_diagonal(model, examples[1::2], "sampled", batch_size=2, seed=5,
                                example_ids=range(1, len(examples), 2))
    monkeypatch.setattr(ewc, "world_size", lambda: 2)
    monkeypatch.setattr(ewc, "rank", lambda: 1)
    monkeypatch.setattr(ewc, "all_reduce_", lambda tensors, op="sum": None)
    guessed, _ = fisher_diagonal(model, examples[1::2], "sampled", batch_size=2, seed=5)
    for name, f in placed.items():
        assert torch.equal(guessed[name], f), name
