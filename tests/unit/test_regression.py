"""Pinned numbers: a refactor that changes no behaviour changes none of these (as torchtune's recipe tests pin losses).

Every value below was computed at commit 85a3d96 (before the issue #10 restructuring) on CPU, fp32, seed 0, by
running exactly what each test runs. A change that moves one of them changes what users get: either it is a
bug, or the new values are re-pinned in the same commit with the reason in its message.

On CUDA (where ``train_stage`` runs when a GPU is there) cuBLAS orders its reductions differently, so the
bound is looser there; on CPU it is 1e-5 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from forgetless.models import LoraSettings, attach_lora
from forgetless.training.loop import TrainConfig, train_stage
from tests.unit.tiny_model import make_tiny_model, random_examples
from tests.unit.tiny_tokenizer import make_tiny_tokenizer

# train_stage and the experiment runner pick the accelerator themselves: the bound follows where they run.
REL = 1e-3 if torch.cuda.is_available() else 1e-5

# 5 optimizer steps of the general stage, then 5 of the domain stage, continuing the same adapter (lora-nu-mu).
# lr 5e-2: large enough that a small change in the update (Adam's eps 1e-8 -> 1e-6 moves step 4 of the domain stage
# by 4e-3) shows well above the bound.
PINNED_LOSSES = {
    "general": [4.18894624710083, 4.183307647705078, 4.184447288513184, 4.177022933959961, 4.212013244628906],
    "domain": [4.178275108337402, 4.1511945724487305, 4.1844162940979, 4.131093978881836, 4.177341461181641],
}


def test_lora_nu_mu_loss_sequence_is_pinned():
    torch.manual_seed(0)  # LoRA's A is drawn from the global RNG
    model = attach_lora(make_tiny_model(), LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(max_steps=5, batch_size=4, lr=5e-2, precision="fp32", seed=0, progress=False)
    general = train_stage(model, random_examples(20, 12, seed=0), cfg, stage="general")
    domain = train_stage(model, random_examples(20, 12, seed=1, prompt=4), cfg, stage="domain")
    assert [r["loss"] for r in general.history] == pytest.approx(PINNED_LOSSES["general"], rel=REL)
    assert [r["loss"] for r in domain.history] == pytest.approx(PINNED_LOSSES["domain"], rel=REL)


# The tiny experiment below: per method, general PPL, task acc / acc_norm, the domain stage's losses and the
# method's own logged scalars (its regularizer before weighting, SAM's gradient norm), WiSE-FT's variants' PPL.
_GENERAL_LOSSES = [5.99610710144043, 5.991940021514893, 5.987790584564209]
_NU_MU_DOMAIN = [5.980798721313477, 5.929721355438232, 6.02362060546875, 5.950329780578613]
PINNED_EXPERIMENT = {
    "base": {"ppl": 404.6481798074589, "acc": 5 / 12, "acc_norm": 0.25, "general": None, "domain": None},
    "lora-mu": {"ppl": 392.53575937896807, "acc": 5 / 12, "acc_norm": 0.25, "general": None,
                "domain": [6.004610538482666, 5.988832473754883, 5.960885524749756, 5.921134948730469]},
    "lora-nu-mu": {"ppl": 402.4600169922535, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
                   "domain": _NU_MU_DOMAIN},
    # the paper's HLoRA (eq 13 with the absolute xi, omega as summed, phi 1e-3 absolute) and replay by examples:
    # values from 85a3d96
    "hlora(nonnegative=none,phi=0.001,phi_scale=absolute,xi=0.001,xi_mode=absolute)": {"ppl": 402.46386796235277, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
              "domain": [5.980798721313477, 5.929750442504883, 6.023695468902588, 5.95045804977417],
              "scalar": ("reg_loss", [0.0, 0.029038596898317337, 0.06926576048135757, 0.1196284070611])},
    # EWC's sampled Fisher draws each example's labels from its own generator since session 33 (the same draws under
    # any number of processes): both ewc rows re-pinned then
    "ewc(lambda=1.0)": {"ppl": 402.3192707736833, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
            "domain": [5.980798721313477, 5.932161808013916, 6.029507637023926, 5.958472728729248],
            "scalar": ("ewc_penalty", [0.0, 0.0024396274238824844, 0.0058425008319318295, 0.008376212790608406])},
    "sam(rho=0.05)": {"ppl": 396.2022652684789, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
            "domain": [5.980798721313477, 5.92332124710083, 6.014242649078369, 5.936804294586182],
            "scalar": ("sam_grad_norm", [0.18652300536632538, 0.37407103180885315, 0.2239322066307068,
                                         0.1816360056400299])},
    "replay(by=examples)": {"ppl": 384.2375617754953, "acc": 4 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
               "domain": [6.029429912567139, 6.017865180969238, 5.950084686279297, 5.94231653213501]},
    # issue #13's rules (relative xi, omega clamped at the stage's end; replay by labelled tokens) at the old weight
    # phi 1e-3 (absolute), pinned at 05677c2
    "hlora(phi=0.001,phi_scale=absolute)": {"ppl": 402.4582514435306, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
              "domain": [5.980798721313477, 5.929816246032715, 6.023900508880615, 5.950806617736816],
              "scalar": ("reg_loss", [0.0, 0.09485526382923126, 0.27025163173675537, 0.46374067664146423])},
    # issue #13 item 4's default weights (hlora phi 10 on the mean scale, ewc lambda 100, sam rho 1.0; chosen in
    # docs/results/defaults), pinned when they were set: the runs above are the same methods at the old weights
    "hlora": {"ppl": 396.709270862092, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
              "domain": [5.980798721313477, 15.424470901489258, 8.44837474822998, 6.620262622833252],
              "scalar": ("reg_loss", [0.0, 0.09485526382923126, 0.024537280201911926, 0.006974095944315195])},
    "ewc": {"ppl": 391.99660245903357, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
            "domain": [5.980798721313477, 6.173685073852539, 6.084893226623535, 5.9668145179748535],
            "scalar": ("ewc_penalty", [0.0, 0.0024396274238824844, 0.0009713285253383219, 0.0004553122853394598])},
    "sam": {"ppl": 411.93829898508864, "acc": 4 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
            "domain": [5.980798721313477, 5.974900245666504, 6.023272514343262, 5.982057094573975],
            "scalar": ("sam_grad_norm", [0.18652300536632538, 0.30991798639297485, 0.18797384202480316,
                                         0.233957439661026])},
    "replay": {"ppl": 389.7330497986735, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
               "domain": [5.9385786056518555, 5.964683532714844, 5.991069316864014, 5.894197940826416]},
    "wise-ft": {"ppl": 402.4600169922535, "acc": 5 / 12, "acc_norm": 0.25, "general": _GENERAL_LOSSES,
                "domain": _NU_MU_DOMAIN,
                "variants": {"wise-ft(alpha=0.25)": 390.55630609954375, "wise-ft(alpha=0.5)": 396.3469696574222,
                             "wise-ft(alpha=0.75)": 400.19368258200785}},
}
_ENTRIES = {"hlora(nonnegative=none,phi=0.001,phi_scale=absolute,xi=0.001,xi_mode=absolute)": {
                "name": "hlora", "nonnegative": "none", "xi": 0.001, "xi_mode": "absolute", "phi": 0.001,
                "phi_scale": "absolute"},
            "hlora(phi=0.001,phi_scale=absolute)": {"name": "hlora", "phi": 0.001, "phi_scale": "absolute"},
            "ewc(lambda=1.0)": {"name": "ewc", "lambda": 1.0}, "sam(rho=0.05)": {"name": "sam", "rho": 0.05},
            "replay(by=examples)": {"name": "replay", "by": "examples"}}
_WORDS = ["plants", "light", "sugar", "answer", "water", "air", "carbon", "oxygen"]


def _write_experiment(tmp_path) -> "object":
    from forgetless.experiment import load_experiment

    tok = make_tiny_tokenizer()
    make_tiny_model(vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"Plants make sugar from light and {_WORDS[i % 8]}, sentence {i}."})
                            + "\n" for i in range(40)))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"question": f"What do plants absorb, case {i}?",
                                        "choices": [_WORDS[i % 8], _WORDS[(i + 3) % 8], _WORDS[(i + 5) % 8]],
                                        "answer": i % 3}) + "\n" for i in range(12)))
    exp = {"name": "pin", "model": str(tmp_path / "tiny"), "output": str(tmp_path / "out"), "seeds": [0],
           "precision": "fp32", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
           "general": {"train": {"source": str(text)}, "heldout": {"source": str(text), "limit": 10}, "block_size": 16},
           "tasks": [{"name": "t", "train": str(task), "test": str(task)}],
           "methods": [_ENTRIES.get(label, label) for label in PINNED_EXPERIMENT],
           "train": {"general": {"max_steps": 3, "batch_size": 4, "lr": 0.05},
                     "domain": {"max_steps": 4, "batch_size": 4, "lr": 0.05}},
           "eval": {"batch_size": 4}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return load_experiment(tmp_path / "exp.yaml")


def test_tiny_experiment_results_are_pinned(tmp_path):
    from forgetless.experiment import run_experiment

    results = {r["method"]: r for r in run_experiment(_write_experiment(tmp_path), progress=False)}
    assert sorted(results) == sorted(PINNED_EXPERIMENT)
    for method, pin in PINNED_EXPERIMENT.items():
        r = results[method]
        assert r["general_ppl"] == pytest.approx(pin["ppl"], rel=REL), method
        assert r["tasks"]["t"]["acc"] == pytest.approx(pin["acc"]), method
        assert r["tasks"]["t"]["acc_norm"] == pytest.approx(pin["acc_norm"]), method
        stages = {s["stage"]: s for s in r["stages"]}
        for stage in ("general", "domain"):
            if pin[stage] is None:
                assert stage not in stages, (method, stage)
                continue
            losses = [row["loss"] for row in stages[stage]["history"]]
            assert losses == pytest.approx(pin[stage], rel=REL), (method, stage)
        if "scalar" in pin:
            name, values = pin["scalar"]
            logged = [row[name] for row in stages["domain"]["history"]]
            assert logged == pytest.approx(values, rel=REL * 10, abs=1e-9), (method, name)
        variants = {label: v["general_ppl"] for label, v in r["variants"].items()}
        assert variants == pytest.approx(pin.get("variants", {}), rel=REL), method
