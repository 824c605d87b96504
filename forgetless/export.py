"""Export a fine-tune: a merged full model, or a PEFT adapter of a WiSE-FT point.

* :func:`export_merged`: the base with the adapter merged in (PEFT ``merge_and_unload``: ``W + s B A``, computed in
  float32), saved with its tokenizer in the base's dtype, so it loads with ``AutoModelForCausalLM`` alone.
* :func:`export_wise_ft`: the exact weight-space blend ``W + (1 - a) dW_nu + a dW_mu`` of WiSE-FT (eq 1 of Wortsman et
  al. 2022, :mod:`forgetless.methods.wise_ft`) as a PEFT adapter of rank ``r_nu + r_mu``: the stacked factors
  ``s [(1-a) B_nu, a B_mu] [A_nu; A_mu]`` that :meth:`WiseFT.interpolated` evaluates in memory, with ``s`` folded into
  B so that the adapter's own scaling is 1 (``lora_alpha = r``), which holds for rsLoRA adapters too. PEFT's
  ``add_weighted_adapter(combination_type="cat")`` builds the same factors but keeps ``use_rslora``, whose scaling
  ``alpha / sqrt(r)`` is then not 1.

``theta_nu`` is the general stage's adapter: the ``wise_ft_theta_nu.safetensors`` file the ``wise-ft`` method keeps
with a cached general stage, a folder holding it, or a general stage's adapter folder (``adapter_model.safetensors``).
The base is loaded unquantized: an adapter trained on a 4-bit base is merged into the full-precision weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from forgetless.lora import DEFAULT_ADAPTER, lora_modules, scaling
from forgetless.methods import wise_ft
from forgetless.models import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE, EMBEDDED_MODELS, SCALING_FIELDS,
                               AdapterError, adapter_record, base_fingerprint, expand_model_name, is_gguf,
                               load_adapter, load_adapter_weights, load_model, lora_config_differences,
                               weights_digest)

DTYPES = {"base": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def base_dtype(model_name: str) -> torch.dtype:
    """The dtype the base's weights are stored in: its configuration's (a folder or a hub id); float32 for a GGUF
    file, whose quantized blocks forgetless dequantizes to float32."""
    model_name = expand_model_name(model_name)
    if model_name in EMBEDDED_MODELS or is_gguf(model_name):
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def export_merged(model_name: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "base") -> Path:
    """Write ``model_name`` with the adapter in ``adapter_dir`` merged in, and its tokenizer, to ``out_dir``.

    ``dtype``: ``base`` (the dtype the base is stored in, :func:`base_dtype`), ``bf16`` or ``fp32``. The merge is
    computed in float32 and rounded once to that dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_output(Path(out_dir))
    target = DTYPES[dtype] or base_dtype(model_name)
    model, tokenizer = load_model(model_name, dtype="fp32")
    peft_model = load_adapter(model, adapter_dir)
    _untie_adapted_embeddings(peft_model)
    merged = peft_model.merge_and_unload()
    merged.to(target)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _write_folder(Path(out_dir), write)


def _untie_adapted_embeddings(peft_model: torch.nn.Module) -> None:
    """A base whose head shares the input embeddings' weight (tied, as SmolLM2's and Gemma's) and an adapter on one of
    them: merging would add the update to the shared weight, so to both (the exported model then differs from the
    adapter's). The adapted side gets its own copy, and the configuration says the two are no longer tied."""
    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embeddings is None:
        return
    shared = head.weight.data_ptr() == embeddings.weight.data_ptr()
    adapted = [m for m in (head, embeddings) if hasattr(m, "base_layer")]
    if not (shared and adapted):
        return
    for layer in adapted:
        inner = layer.get_base_layer()
        inner.weight = torch.nn.Parameter(inner.weight.detach().clone(), requires_grad=False)
    for config in (base.config, getattr(base.config, "get_text_config", lambda: None)()):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def export_wise_ft(model_name: str, adapter_dir: str | Path, theta_nu: str | Path, alpha: float,
                   out_dir: str | Path) -> Path:
    """Write the WiSE-FT point ``alpha`` between ``theta_nu`` (0) and the adapter in ``adapter_dir`` (1) as a PEFT
    adapter of rank ``r_nu + r_mu`` to ``out_dir`` (see the module docstring)."""
    from peft import get_peft_model_state_dict

    alpha = float(alpha)
    check_output(Path(out_dir))
    nu_file = _theta_nu_file(Path(theta_nu))  # checked (and a file read) before the model loads
    if nu_file is not None:
        try:
            nu_state, metadata = wise_ft.STATE.load(nu_file)
        except ValueError as err:  # not the state file's "delete it to recompute": here it may be the only copy
            raise AdapterError(f"{nu_file}: unreadable wise-ft theta_nu file ({err.__cause__ or err})") from None
    model, _ = load_model(model_name, dtype="fp32")
    model = load_adapter(model, adapter_dir, trainable=True)  # WiseFT interpolates the trainable parameters
    model.eval()
    config = model.peft_config[DEFAULT_ADAPTER]
    if config.use_dora or config.lora_bias:
        raise AdapterError(f"{adapter_dir}: a DoRA or LoRA-bias adapter is not a sum of B A updates; "
                           "WiSE-FT cannot be exported as stacked factors")
    modules = lora_modules(model)
    if len(modules) != sum(1 for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_embedding_A." in n):
        raise AdapterError(f"{adapter_dir}: LoRA on embeddings or convolutions has no stacked-factor export")
    method = wise_ft.WiseFT(alphas=[alpha])
    if nu_file is not None:
        method.theta_nu = nu_state
        _note_other_space(nu_file, metadata)
    else:
        _check_same_lora(Path(theta_nu), config)
        method.theta_nu = _adapter_theta(model, Path(theta_nu), Path(adapter_dir))
    _check_theta_nu(Path(adapter_dir), Path(theta_nu), method.theta_nu)
    if nu_file is not None:  # a folder's adapter was loaded strictly into the model (load_adapter_weights)
        _check_nu_layout(nu_file, method.theta_nu, model)
    with method.interpolated(model, alpha):  # every LoRA layer holds the stacked rank r_nu + r_mu factors
        tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}
        ranks = {name: int(module.lora_A[DEFAULT_ADAPTER].weight.shape[0]) for name, module in modules}
    for name, module in modules:  # s folded into B: the exported adapter's scaling is 1
        key = f"{name}.lora_B.weight"
        tensors[key] = tensors[key] * scaling(module)
    rank = max(ranks.values())
    prefix = "base_model.model."
    pattern = {name.removeprefix(prefix): r for name, r in ranks.items() if r != rank}
    stacked = replace(config, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern=pattern,
                      alpha_pattern=dict(pattern), inference_mode=True)

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        stacked.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        record = {"model": model_name, "fingerprint": base_fingerprint(model),
                  "wise_ft": {"alpha": alpha, "theta_nu": str(theta_nu), "theta_mu": str(adapter_dir)}}
        (folder / BASE_FILE).write_text(json.dumps(record))

    out = _write_folder(Path(out_dir), write)
    if not (out / ADAPTER_CONFIG).is_file():  # pragma: no cover - PEFT's file name changed
        raise AdapterError(f"{out}: PEFT wrote no {ADAPTER_CONFIG}")
    return out



def _check_same_lora(source: Path, config: Any) -> None:
    """AdapterError when a general stage's adapter folder has other LoRA scaling or targets than the domain adapter:
    its B A would be scaled by the domain adapter's s (a blend of no run)."""
    try:
        theirs = json.loads((source / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{source / ADAPTER_CONFIG}: unreadable ({err})") from None

    # theta_nu's factors are scaled by mu's config: the same scale and the same layers
    changed = [f"{key}: {there!r} there, {here!r} in the adapter" for key, (there, here)
               in lora_config_differences(theirs, config, (*SCALING_FIELDS, "target_modules")).items()]
    if changed:
        raise AdapterError(f"{source}: theta_nu's LoRA settings differ from the adapter's ({'; '.join(changed[:3])}): "
                           f"WiSE-FT blends two stages of one run, with one LoRA configuration")


def _check_nu_layout(source: Path, theta_nu: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """AdapterError when theta_nu does not hold exactly the adapter's trainable weights, in their shapes: a layer it
    lacks kept the whole dW_mu (not a dW_mu), another rank's factors were scaled by the adapter's s."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    for problem, keys in (("lacks", set(params) - set(theta_nu)), ("has a weight the adapter lacks:",
                                                                     set(theta_nu) - set(params))):
        if keys:
            raise AdapterError(f"{source}: theta_nu {problem} {sorted(keys)[0]!r} ({len(keys)} in all): it is not "
                               f"the general stage of the run that trained the adapter (other LoRA targets?)")
    for name, shape in sorted(params.items()):
        if tuple(theta_nu[name].shape) != shape:
            raise AdapterError(f"{source}: theta_nu's {name!r} has shape {tuple(theta_nu[name].shape)}, the "
                               f"adapter's {shape} (another LoRA rank?): it is not the general stage of the run "
                               f"that trained the adapter")


def _check_theta_nu(adapter_dir: Path, source: Path, theta_nu: dict[str, torch.Tensor]) -> None:
    """AdapterError when the adapter's record names the weights its domain stage started from (``domain_start``,
    written by ``forgetless run`` since session 31) and ``theta_nu`` is not them: another seed's or another run's
    general stage would give a WiSE-FT point of no run, silently."""
    recorded = adapter_record(adapter_dir).get("domain_start")
    if recorded is None:  # an adapter saved without it (runs before session 31): nothing to check
        return
    got = weights_digest(theta_nu)
    if got != recorded:
        raise AdapterError(f"{source}: not the theta_nu that {adapter_dir}'s domain stage started from (weights "
                           f"digest {got}, the adapter records {recorded}); pass that run's general stage: the "
                           f"folder OUTPUT/stages/<general_stage> named in OUTPUT/runs/<run id>.json")


def _note_other_space(nu_file: Path, metadata: dict) -> None:
    """A warning when the run that saved ``nu_file`` scored WiSE-FT in factor space (``space: factors``): the export
    is the weight-space blend, so its scores are not that run's ``wise-ft(alpha=a)`` variant."""
    options = metadata.get("options") if isinstance(metadata, dict) else None
    if isinstance(options, dict) and options.get("space", "weights") != "weights":
        warnings.warn(f"{nu_file}: the run that saved it interpolated the LoRA factors (space: {options['space']}); "
                      f"this export is the weight-space blend W + (1-a) dW_nu + a dW_mu, so its scores differ from "
                      f"that run's wise-ft variants", stacklevel=3)


def _theta_nu_file(source: Path) -> Path | None:
    """The wise-ft file holding theta_nu, or None when ``source`` is a general stage's adapter folder."""
    if source.is_file() or (source / wise_ft.FILENAME).is_file():
        return wise_ft.STATE.locate(source)
    if (source / ADAPTER_WEIGHTS).is_file():
        return None
    raise AdapterError(f"{source}: neither a wise-ft theta_nu file ({wise_ft.FILENAME}) nor a folder with it or "
                       f"with a general stage's adapter ({ADAPTER_WEIGHTS})")


def _adapter_theta(model: torch.nn.Module, source: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """theta_nu keyed like the model's trainable parameters, from a general stage's adapter: loaded strictly into
    the model, read, and the domain adapter put back."""
    load_adapter_weights(model, source)
    nu = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    load_adapter_weights(model, adapter_dir)
    return nu


def check_output(out: Path) -> None:
    """An export goes to a new or empty folder; anything else is refused before a model loads."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose another output folder")


def _write_folder(out: Path, write) -> Path:
    """``write(folder)`` into a temporary folder beside ``out``, then moved there: a half-written export is never left
    as ``out``, nor the temporary folder on any failure. ``out`` may be an empty folder the user made (``.``, a
    symbolic link to one): it is filled in place, the folder itself kept."""
    check_output(out)
    out = out.resolve()  # "." has no name to put a sibling beside; a link's target is where the files go
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"  # a new name: nothing of the user's is ever
    tmp.mkdir()  # removed (a fixed OUT.tmp was, whatever it held); mkdir, not mkdtemp: the folder keeps the umask's mode
    moved: list[Path] = []
    try:
        write(tmp)
        if out.exists():  # empty (checked): the files move in, one rename each
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, out / entry.name)
                moved.append(out / entry.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        for path in moved:  # the folder as it was: empty
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_merged", "export_wise_ft", "base_dtype", "check_output"]
