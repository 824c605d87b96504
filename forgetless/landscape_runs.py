"""The experiment step that adds flatness metrics to finished runs (the YAML's ``landscape:`` section).

:func:`measure_runs` goes over an experiment's finished runs, loads each run's domain-stage model (its saved
adapter on the base as the run loaded it: its ``dtype`` and ``quantization``), measures it with
:func:`forgetless.landscape.measure_flatness` on a small fixed held-out general-text set and writes the metrics
into the run's JSON; runs that already have metrics for the same settings are skipped, so it is resumable. A run
whose adapter files are byte for byte another measured run's (WiSE-FT trains ``lora-nu-mu``'s model) gets that run's
measurement copied, marked ``same_model_as``, instead of measuring the same model twice. It lives beside the runner,
not in :mod:`forgetless.landscape`, which is mathematics only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from forgetless.config import BASE_DEFAULTS
from forgetless.landscape import LandscapeSettings, measure_flatness, save_surface
from forgetless.precision import default_device
from forgetless.progress import say


class LandscapeFailed(RuntimeError):
    """Runs whose flatness could not be measured, each named with why (``problems``); what could be measured was
    written."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"landscape: {len(problems)} run(s) not measured (the others are):\n  - "
                         + "\n  - ".join(problems))
        self.problems = problems

    def __reduce__(self):  # from a worker process, as it was raised
        return type(self), (self.problems,)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


# the files of an adapter folder that load_adapter reads (adapter_model.bin: a PEFT adapter saved without safetensors)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "forgetless_base.json")
_HASHES: dict[tuple, str] = {}  # adapter_sha256 by folder and its files' (name, size, mtime): read once


def adapter_sha256(folder: Path) -> str | None:
    """sha256 over the sorted names and bytes of the adapter files in ``folder`` (:data:`ADAPTER_FILES`): two runs
    with the same one are the same model on the same base; None when the folder has none of them."""
    folder = Path(folder)
    files = [(name, folder / name) for name in sorted(ADAPTER_FILES) if (folder / name).is_file()]
    if not files:
        return None
    key = (str(folder.resolve()), *((name, path.stat().st_size, path.stat().st_mtime_ns) for name, path in files))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for name, path in files:
            if name == "adapter_config.json":  # PEFT writes its sets (target_modules) in the process's hash order
                content = _canonical_config(path)
                digest.update(f"{name}\0{len(content)}\0".encode() + content)
                continue
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _canonical_config(path: Path) -> bytes:
    """``adapter_config.json`` with sorted keys and its lists of names sorted: the same adapter saved by two processes
    can list ``target_modules`` (a set in PEFT) in two orders; unreadable JSON is taken as it is."""
    raw = path.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(config, dict):
        return raw

    def canonical(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return {k: canonical(v) for k, v in value.items()} if isinstance(value, dict) else value

    return json.dumps(canonical(config), sort_keys=True).encode()


def _same_model(output: Path, rid: str, sha: str, digests: dict[str, Any], base: dict[str, str],
                every: bool) -> tuple[str, dict[str, Any]] | None:
    """(run id, landscape entry) of another run under ``output`` whose LoRA-direction measurement has these settings
    (``digests["main"]``) and this base, on an adapter with hash ``sha`` (recorded, or of its adapter folder when an
    older entry has none); one that also has the all-weights measurement first when ``every``. None when there is
    none. Records are read afresh (another worker may have measured one since); one that cannot be read (corrupt,
    or being replaced) is passed over: the run is measured rather than matched."""
    found = None
    for path in sorted((Path(output) / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            other, entry = record.get("run_id", path.stem), record.get("landscape") or {}
            if (other == rid or entry.get("digest") != digests["main"] or entry.get("base", {}) != base
                    or "metrics" not in entry or "skipped" in entry):
                continue
            known = entry.get("adapter_sha256") or adapter_sha256(Path(output) / "adapters" / str(other))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if known != sha:
            continue
        if not every or (entry.get("all_weights") or {}).get("digest") == digests["every"]:
            return other, entry
        found = found or (other, entry)
    return found


def _measure(model: torch.nn.Module, examples: list[dict], settings: LandscapeSettings, output: Path, where: Path,
             progress: bool) -> dict[str, Any]:
    """``{metrics, tokens, seconds[, surface]}`` of ``model`` under ``settings``; the surface (when swept and kept)
    goes to ``output / where`` with its figures, and ``surface`` is its path relative to ``output``."""
    from forgetless.reporting.landscape_plots import plot_surface

    started = time.perf_counter()
    metrics, surface = measure_flatness(model, examples, settings, progress=progress)
    out = {"metrics": metrics, "tokens": int(sum(len(e["input_ids"]) - 1 for e in examples)),
           "seconds": round(time.perf_counter() - started, 2)}
    if surface is not None and settings.save_surfaces:
        save_surface(surface, Path(output) / where / "surface.npz")
        plot_surface(surface, Path(output) / where)
        out["surface"] = str(where / "surface.npz")
    return out


def run_base(record: dict[str, Any]) -> dict[str, str]:
    """The run's base as its settings say it was loaded: ``dtype`` and ``quantization`` where not the defaults."""
    run = record.get("settings") or {}
    return {k: run[k] for k, default in BASE_DEFAULTS.items() if run.get(k, default) != default}


def _todo(output: Path, model_name: str, settings: LandscapeSettings, block_size: int, data_key: Any,
          only: Collection[str] | None = None) -> tuple[list[tuple[Path, dict, bool, bool]], list[dict[str, Any]],
                                                         dict[str, Any]]:
    """(runs to measure as (path, record, main surface?, all-weights surface?), every record in the folder (of
    ``only``, record file stems, when given: an experiment's planned runs), digests)."""
    block = settings.block_size or block_size
    extra = {"data": data_key, "block_size": block, "model": model_name}
    every = settings.all_weights()
    digests = {"block": block, "main": settings.digest(extra), "every": every.digest(extra) if every else None}
    from forgetless.reporting.tables import read_record

    todo, records = [], []
    for path in sorted((Path(output) / "runs").glob("*.json")):
        if only is not None and path.stem not in only:  # a run the experiment no longer plans (another seed,
            continue  # method or base model): neither measured nor counted, as the tables leave it out
        record = read_record(path)  # a corrupt record: an error naming it
        records.append(record)
        entry = record.get("landscape") or {}
        # measured on another base than the run's (a QLoRA run measured before the landscape loaded it quantized)
        main = entry.get("digest") != digests["main"] or entry.get("base", {}) != run_base(record)
        also = (every is not None and record.get("seed", 0) in settings.all_weights_seeds
                and (main or (entry.get("all_weights") or {}).get("digest") != digests["every"]))
        if main or also:
            todo.append((path, record, main, also))
    return todo, records, digests


def left_line(output: Path, model_name: str, settings: LandscapeSettings, block_size: int, data_key: Any = None,
              workers: int = 1, jobs_hint: bool = False, only: Collection[str] | None = None) -> str:
    """``"K/N runs' flatness measured; about T left"``: the landscape step's progress, the time left estimated from
    the measurements already in the records (mean seconds of a LoRA-direction measurement and of an all-weights one,
    times what is left of each, over ``workers``). ``jobs_hint``: say after an estimate that ``--jobs N`` divides it
    (``run --dry-run``)."""
    from forgetless.experiment import _hours

    todo, records, digests = _todo(output, model_name, settings, block_size, data_key, only)
    line = f"{len(records) - len(todo)}/{len(records)} runs' flatness measured"
    if not todo:
        return line
    spent = _mean_seconds(records, digests)
    seconds, timed, untimed, runs = 0.0, 0, 0, 0
    counted = _measured_adapters(records, digests)  # per kind, the adapters measured or counted: later ones are copied
    for path, record, main, also in todo:
        folder = Path(output) / "adapters" / record.get("run_id", path.stem)
        adapter = folder / "adapter_config.json"
        sha = adapter_sha256(folder) if adapter.is_file() else None
        model = (sha, json.dumps(run_base(record), sort_keys=True)) if sha is not None else None  # adapter and base
        measures = False
        # a run without trained weights is skipped at once when only the trainable directions are asked for
        for kind, wanted in (("main", main and (adapter.is_file() or settings.params != "trainable")),
                             ("every", also)):
            if wanted and model is not None:
                wanted = model not in counted[kind]  # the same model as one measured or counted: copied, no time
                counted[kind].add(model)
            if wanted and spent[kind] is not None:
                seconds, timed = seconds + spent[kind], timed + 1
            elif wanted:
                untimed += 1
            measures = measures or wanted
        runs += measures  # the runs with a measurement to make: what the workers share
    if timed:
        line += f"; about {_hours(seconds / max(1, min(workers, runs)))} left"
        if untimed:
            line += f" besides {untimed} measurement(s) of a kind not timed yet"
        if jobs_hint:
            line += " (with --jobs N, about 1/N of it)"
    elif untimed:
        line += "; the time left is estimated once a measurement of each kind has finished"
    return line


def _measured_adapters(records: list[dict[str, Any]], digests: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """The (adapter hash, base) pairs of the LoRA-direction (``"main"``) and all-weights (``"every"``) measurements
    ``records`` hold with these settings: a run still to measure with one of them is copied."""
    found: dict[str, set[tuple[str, str]]] = {"main": set(), "every": set()}
    for record in records:
        entry = record.get("landscape") or {}
        sha, base = entry.get("adapter_sha256"), entry.get("base", {})
        if (sha is None or entry.get("digest") != digests["main"] or "metrics" not in entry
                or base != run_base(record)):  # measured on another base than its run's: measured again
            continue
        model = (sha, json.dumps(base, sort_keys=True))
        found["main"].add(model)
        if (entry.get("all_weights") or {}).get("digest") == digests["every"]:
            found["every"].add(model)
    return found


def _mean_seconds(records: list[dict[str, Any]], digests: dict[str, Any]) -> dict[str, float | None]:
    """Mean seconds of a measurement over the LoRA directions (``"main"``) and over all weights (``"every"``) among
    ``records`` measured with these settings; None for a kind not measured yet."""
    spent: dict[str, list[float]] = {"main": [], "every": []}
    for record in records:
        entry = record.get("landscape") or {}  # a copy of another run's measurement (same_model_as) took no time
        if entry.get("digest") == digests["main"] and "seconds" in entry and "same_model_as" not in entry:
            spent["main"].append(float(entry["seconds"]))
        every = entry.get("all_weights") or {}
        if every.get("digest") == digests["every"] and "seconds" in every and "same_model_as" not in every:
            spent["every"].append(float(every["seconds"]))
    return {kind: sum(values) / len(values) if values else None for kind, values in spent.items()}


def seconds_per_run(output: Path, model_name: str, settings: LandscapeSettings, block_size: int,
                    data_key: Any = None) -> Callable[[bool, int], float]:
    """``estimate(trains, seed)``: the seconds of measuring one run still to train (``trains``: it will have an
    adapter; ``seed``: whether it gets the all-weights surface), from the measurements already recorded (read once);
    a kind not measured yet counts 0."""
    _, records, digests = _todo(output, model_name, settings, block_size, data_key)
    spent = _mean_seconds(records, digests)

    def estimate(trains: bool, seed: int) -> float:
        main = spent["main"] if trains or settings.params != "trainable" else None
        every = spent["every"] if settings.all_weights_seeds and seed in settings.all_weights_seeds else None
        return (main or 0.0) + (every or 0.0)

    return estimate


def runs_to_measure(output: Path, model_name: str, settings: LandscapeSettings, block_size: int,
                    data_key: Any = None, only: Collection[str] | None = None) -> list[str]:
    """The run ids (record file stems) that :func:`measure_runs` would measure."""
    return [path.stem for path, *_ in _todo(output, model_name, settings, block_size, data_key, only)[0]]


def measure_runs(output: Path, model_name: str, settings: LandscapeSettings, heldout_texts: Callable[[], list[str]],
                 block_size: int, data_key: Any = None, progress: bool = True,
                 only: Collection[str] | None = None, planned: Collection[str] | None = None) -> int:
    """Add ``record["landscape"]`` to every run JSON under ``output/runs`` that lacks it (for these settings).

    The model of a run is ``model_name`` plus the run's adapter (``output/adapters/RUN_ID``, the weights after the
    domain stage); a run that trained nothing (``base``) is measured only with ``params: all``. The evaluation set
    is the first ``settings.blocks`` blocks of ``heldout_texts()`` (loaded only if a run needs measuring).
    With ``settings.all_weights_seeds``, the runs of those seeds (``base`` included) also get the surface over
    all weights, ``record["landscape"]["all_weights"]`` (its own digest: adding it measures only it). Returns how
    many runs were measured. ``only``: measure only these runs (record file stems), as one of several worker
    processes does; ``planned``: the runs an experiment plans (the others' records are left alone and not counted).

    Each measurement records its adapter's hash (``adapter_sha256``); a run whose adapter has the hash of another
    run measured with these settings on the same base is not measured: that run's entry is copied (its metrics and
    surface files), with ``same_model_as`` naming it and ``seconds`` 0 (so too its all-weights entry, when both need
    one; what the other run lacks is measured). Such a run is not counted as measured.

    A trained run whose adapter is not here (records moved to another machine without their weights) and a run whose
    measurement fails are left as they are, and the others measured; then :class:`LandscapeFailed` names each.
    """
    todo, records, digests = _todo(output, model_name, settings, block_size, data_key, planned)
    if only is not None:
        todo = [item for item in todo if item[0].stem in only]
    if not todo:
        return 0
    if only is None:
        print(f"landscape: measuring {len(todo)} run(s) ({len(records) - len(todo)} already measured)")
    cache: dict[str, Any] = {}  # the evaluation examples, tokenized once
    measured, problems, first = 0, [], None
    for path, record, main, also in todo:
        rid = record.get("run_id", path.stem)
        adapter = Path(output) / "adapters" / rid
        if record.get("stages") and not (adapter / "adapter_config.json").is_file():
            problems.append(f"{rid}: its adapter {adapter} is missing (adapters stay on the machine that trained "
                            f"them): restore it there, or delete {path} to train the run again")
            continue
        try:
            measured += _measure_run(output, model_name, settings, heldout_texts, digests, cache, progress, path,
                                     record, main, also)
        except Exception as error:  # noqa: BLE001 - the others are measured, then every failure is raised
            problems.append(f"{rid}: {type(error).__name__}: {error}")
            first = first or error  # its traceback, as the failure's cause (forgetless --debug shows it)
            continue
        if only is None:
            say(f"    [{left_line(output, model_name, settings, block_size, data_key, only=planned)}]")
    if problems:
        raise LandscapeFailed(problems) from first
    return measured


def _measure_run(output: Path, model_name: str, settings: LandscapeSettings, heldout_texts: Callable[[], list[str]],
                 digests: dict[str, Any], cache: dict[str, Any], progress: bool, path: Path, record: dict[str, Any],
                 main: bool, also: bool) -> int:
    """Measure one run of :func:`measure_runs` and write its record; 1 when a model was measured, 0 when the run
    was only marked skipped (it trained nothing and only the trainable directions are asked for)."""
    from forgetless.data import lm_examples, pack_blocks
    from forgetless.models import is_quantized, load_adapter, load_model

    rid = record.get("run_id", path.stem)
    adapter = Path(output) / "adapters" / rid
    has_adapter = (adapter / "adapter_config.json").is_file()
    base = run_base(record)  # the base as the run loaded it: its dtype and quantization when not the defaults
    quantization = base.get("quantization", "none")
    if main:
        entry = {"digest": digests["main"], "settings": asdict(settings) | {"block_size": digests["block"]}}
        if base:
            entry["base"] = base
    else:
        entry = dict(record["landscape"])
    if main and not has_adapter and settings.params == "trainable":
        entry["skipped"] = "no trained weights (a run without an adapter has no trainable parameters)"
    if also and quantization != "none":
        entry["all_weights"] = {"digest": digests["every"], "skipped": f"the base is {quantization}-quantized: its "
                                f"weights are packed integers, not directions to move along"}
        also = False
    if main and "skipped" not in entry and settings.params == "all" and quantization != "none":
        raise ValueError(f"landscape params: all perturbs every weight, and this run's base is "
                         f"{quantization}-quantized (packed integers): use params: trainable")
    lora = main and "skipped" not in entry  # the LoRA directions still to measure
    sha = adapter_sha256(adapter) if has_adapter and (lora or also) else None
    if sha is not None:
        if main:  # the adapter measured (or copied for): a later run with the same one copies this entry
            entry["adapter_sha256"] = sha
        reused = _reuse(output, rid, sha, digests, base, entry, lora, also)
        lora, also = lora and "main" not in reused, also and "every" not in reused
    if not also and not lora:  # nothing (left) to measure: no model is loaded
        _write_json(path, record | {"landscape": entry})
        return 0
    # dtype auto resolves with the landscape's precision (fp32 by default: the metrics are computed in fp32, on the
    # base's own weights rather than their bf16 rounding); an explicit dtype and a quantization are the run's
    model, tokenizer = load_model(model_name, dtype=base.get("dtype", "auto"), precision=settings.precision,
                                  quantization=quantization)
    if not is_quantized(model):  # a quantized base is placed on the process's GPU as it loads
        model.to(default_device())
    if "examples" not in cache:
        blocks = pack_blocks(heldout_texts(), tokenizer, digests["block"], max_blocks=settings.blocks)
        cache["examples"] = lm_examples(blocks)
    examples = cache["examples"]
    if has_adapter:
        model = load_adapter(model, adapter, trainable=True)  # strict: keys, shapes, base model
    if lora:
        entry |= _measure(model, examples, settings, output, Path("landscape") / rid, progress)
    if also:
        entry["all_weights"] = {"digest": digests["every"]} | _measure(
            model, examples, settings.all_weights(), output, Path("landscape") / rid / "all_weights", progress)
    _write_json(path, record | {"landscape": entry})
    shown_main = entry if "same_model_as" not in entry else None  # a copy was said as it was made
    for name, part in (("", shown_main), (" (all weights)", entry.get("all_weights") if also else None)):
        if part and "metrics" in part:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in part["metrics"].items() if k != "n_params")
            say(f"    {rid}{name}: {shown} ({part['seconds']:.0f} s)")
    del model
    return 1


def _own_surface(output: Path, rid: str, part: dict[str, Any]) -> None:
    """A copied measurement's ``surface`` (``landscape/OTHER/.../surface.npz``) copied, with the figures beside it,
    to ``landscape/RID/...``, and the path rewritten to there."""
    import shutil

    surface = part.get("surface")
    if not isinstance(surface, str) or not surface.startswith("landscape/"):
        return
    source = Path(surface).parent
    own = Path("landscape") / rid / Path(*source.parts[2:])  # the same place under this run's folder
    if source == own or not (output / source).is_dir():
        return
    (output / own).mkdir(parents=True, exist_ok=True)
    for path in (output / source).iterdir():
        if path.is_file():
            shutil.copy2(path, output / own / path.name)
    part["surface"] = str(own / Path(surface).name)


def _reuse(output: Path, rid: str, sha: str, digests: dict[str, Any], base: dict[str, str], entry: dict[str, Any],
           lora: bool, also: bool) -> set[str]:
    """Copy into ``entry`` what another run with the same adapter (hash ``sha``) and base has measured with these
    settings: its LoRA-direction measurement when ``lora``, its all-weights one when ``also``; the kinds copied
    (``"main"``, ``"every"``)."""
    found = _same_model(output, rid, sha, digests, base, also) if lora or also else None
    if found is None:
        return set()
    other, done = found
    source = done.get("same_model_as", other)  # the run that was measured
    reused = set()
    if lora:
        own = ("digest", "settings", "base", "all_weights", "seconds", "same_model_as", "adapter_sha256")
        entry |= {k: v for k, v in done.items() if k not in own} | {"seconds": 0.0, "same_model_as": source}
        reused.add("main")
    every = done.get("all_weights") or {}
    if also and every.get("digest") == digests["every"] and ("metrics" in every or "skipped" in every):
        entry["all_weights"] = every | {"seconds": 0.0, "same_model_as": every.get("same_model_as", other)}
        reused.add("every")
    for part in (entry, entry.get("all_weights") or {}):  # its own copies of the surface files: the record keeps
        _own_surface(output, rid, part)  # pointing at them if the measured run is later set aside and measured again
    if reused:
        what = " and ".join(name for kind, name in (("main", "LoRA directions"), ("every", "all weights"))
                            if kind in reused)
        say(f"    {rid}: the same adapter as {source} (identical files): its flatness ({what}) copied, not measured")
    return reused
