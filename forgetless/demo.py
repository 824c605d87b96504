"""The offline demo: SmolLM2 learns invented facts; measure what it gains and what it forgets.

Needs no hub and no ``../shared``: the model is the embedded SmolLM2 GGUF, the general text is sampled
from the base model itself (so stage nu keeps the model near what it already does), the held-out text
is a few paragraphs written in the project, and the domain task asks about the invented herbal lore of
Isle Corvath (``forgetless/data/demo/facts.tsv``), with different question wording for training and
testing. It runs ``base``, ``lora-mu`` and ``lora-nu-mu`` and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from forgetless.data.demo import DEMO_HELDOUT_TEXT, demo_general_prompts
from forgetless.models import DEFAULT_MODEL, load_model


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sample_general_text(model_name: str, n_per_prompt: int = 2, max_new_tokens: int = 80, seed: int = 0) -> list[str]:
    """General text sampled from the base model, continuing ordinary English openings.

    All samples decode together in one batch: on a CPU each decoding step costs about one read of the
    weights whatever the batch size, so one batch of 32 takes as long as one of 2.
    """
    model, tokenizer = load_model(model_name)
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last real token
    enc = tokenizer(demo_general_prompts(), return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    print(f"sampling {n_per_prompt * len(enc.input_ids)} general-text passages of {max_new_tokens} tokens from the base model")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_p=0.95, temperature=0.8, max_new_tokens=max_new_tokens,
                             num_return_sequences=n_per_prompt, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts if t.strip()]


def demo_experiment(output: Path, model: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """Write the demo's data and experiment YAML into ``output``; return the YAML's path. ``output`` must be new,
    empty, or an earlier demo's folder (its files are the demo's own): files of anything else are not overwritten."""
    _check_demo_folder(output)
    output.mkdir(parents=True, exist_ok=True)
    general = output / "general_sampled.jsonl"
    sampled_by = output / "general_sampled.model"  # which model and seed sampled it: another --model samples anew
    by = sampled_by.read_text() if sampled_by.is_file() else f"{DEFAULT_MODEL} {seed}"  # before the note: the default's
    if not general.is_file() or by != f"{model} {seed}":
        texts = sample_general_text(model, seed=seed)
        tmp = general.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(general)
    sampled_by.write_text(f"{model} {seed}")
    heldout = output / "heldout.txt"
    heldout.write_text(DEMO_HELDOUT_TEXT)
    experiment = {
        "name": "demo",
        "model": model,
        # plain prompts, as the numbers the README reports were measured (auto: SmolLM2-Instruct's chat template)
        "chat_template": False,
        "output": str(output),
        "seeds": [seed],
        # All linear projections, not the library default (q_proj, v_proj): with attention-only LoRA the
        # model did not learn the facts in this budget (measured: 25% test accuracy vs 60% with all seven).
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "general": {"train": {"source": str(general)}, "heldout": {"source": str(heldout)}, "block_size": 64},
        "tasks": [{"name": "corvath", "train": "demo:facts/train", "test": "demo:facts/test"}],
        "methods": ["base", "lora-mu", "lora-nu-mu"],
        "train": {
            "general": {"max_steps": 12, "batch_size": 8, "lr": 5.0e-4},
            "domain": {"epochs": 12, "batch_size": 8, "lr": 1.0e-3, "warmup_ratio": 0.05},
        },
        "eval": {"batch_size": 32},
    }
    path = output / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def _check_demo_folder(output: Path) -> None:
    """ConfigError when ``output`` holds files and is not an earlier demo's folder (its sampled text or note, or an
    experiment.yaml named demo): the demo writes experiment.yaml, heldout.txt and the sampled text there."""
    from forgetless.config import ConfigError

    if output.exists() and not output.is_dir():
        raise ConfigError(f"demo --output {output}: a file, not a folder")
    marks = ("general_sampled.model", "general_sampled.jsonl")  # the demo's own sample (and, since session 30, note)
    if not output.is_dir() or not any(output.iterdir()) or any((output / m).is_file() for m in marks):
        return
    try:
        named = yaml.safe_load((output / "experiment.yaml").read_text()).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        named = None
    if named != "demo":
        raise ConfigError(f"demo --output {output}: the folder holds files that are not a forgetless demo's; the demo "
                          f"writes experiment.yaml, heldout.txt and its data there. Choose a new or empty folder")

