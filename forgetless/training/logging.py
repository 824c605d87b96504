"""Where a training stage's scalars go besides the run record: trackers and the progress display.

The loop (:func:`forgetless.training.loop.train_stage`) keeps each optimizer step's scalars on the device and reads
them every ``log_every`` steps; it then hands the rows of those steps to :class:`StageLog`, which writes them to the
trackers named in ``report_to`` (TensorBoard, Weights & Biases, MLflow) and shows one progress line. Tags are
``STAGE/NAME`` (``domain/loss``, ``general/reg_loss``) and ``eval/...`` for the scores (:func:`log_scores`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from forgetless.progress import line_prefix, plain, say


class Tracker(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, log_dir: Path, run_name: str, first: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a stage resumed at step `first`: the steps after it that the stopped session had written are purged, so
        # the curves do not go back over them
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first + 1 if first else None)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, log_dir: Path, run_name: str, first: int = 0) -> None:
        import wandb  # the project, entity and mode come from the user's WANDB_* variables

        self.run = wandb.init(name=run_name, dir=str(log_dir), reinit="create_new")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, log_dir: Path, run_name: str, first: int = 0) -> None:
        import mlflow  # the tracking server comes from MLFLOW_TRACKING_URI (default ./mlruns)

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(scalars), step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def open_trackers(names: Iterable[str], log_dir: str | Path, first: int = 0) -> list[Tracker]:
    """The trackers ``names`` (TrainConfig.REPORT_TO), writing under ``log_dir`` (a run's folder; its name is the run's
    name in wandb and mlflow); ``first``: the step a resumed stage goes on from."""
    log_dir = Path(log_dir)
    return [_TRACKERS[name](log_dir, log_dir.name, first) for name in names]


def log_scores(names: Iterable[str], log_dir: str | Path, scores: Mapping[str, Any], step: int = 0) -> None:
    """A run's evaluation scores (a run record's ``general_ppl``, ``tasks`` and ``suite``) as ``eval/...`` scalars."""
    flat = {"eval/general_ppl": scores.get("general_ppl")}
    for section in ("tasks", "suite"):
        for task, values in (scores.get(section) or {}).items():
            flat |= {f"eval/{task}/{k}": v for k, v in values.items() if k != "n"}
    flat = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float))}
    for tracker in open_trackers(names, log_dir):
        tracker.log(flat, step)
        tracker.close()


class StageLog:
    """One stage's progress display and trackers, fed at the logging interval with host values only.

    On a terminal the progress is a tqdm bar; elsewhere (a log file, CI) tqdm would write a line per update, so it is
    one plain line per logging interval instead: ``train domain: step 20/100 loss 2.3141 lr 0.0002 1830 tokens/s``.
    """

    def __init__(self, stage: str, total: int, first: int, progress: bool, trackers: list[Tracker]) -> None:
        self.stage, self.total, self.trackers = stage, total, trackers
        self.bar = None
        self.plain = progress and plain(sys.stderr)
        if progress and not self.plain:
            self.bar = tqdm(total=total, desc=f"train {stage}", initial=first)
        self.tokens, self.since = 0, time.perf_counter()
        self.paused = 0.0  # seconds of the current interval spent outside training (evaluation, a checkpoint)

    def pause(self, seconds: float) -> None:
        """``seconds`` of the current interval that were no training (``eval.every``'s evaluation, a checkpoint's
        write): left out of the interval's ``tokens_per_s``."""
        self.paused += seconds

    def step(self, tokens: int) -> None:
        """One optimizer step done, over ``tokens`` input tokens (no device value is read)."""
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def write(self, rows: list[dict[str, Any]], scores: Sequence[Mapping[str, Any]] = ()) -> None:
        """The rows (host values) of the steps since the last call, and scores taken while training
        (``{"step": k, name: score}``): to the trackers and the progress display."""
        # one call per step, in ascending steps, a step's scores beside its row: wandb drops a log whose step is
        # below one it has seen (the scores of step 0 and 10 written before rows 1-10 lost rows 1-9)
        by_step: dict[int, dict[str, float]] = {}
        for row in scores:
            by_step.setdefault(int(row["step"]), {}).update({f"{self.stage}/eval/{k}": float(v) for k, v in row.items()
                                                             if k != "step" and isinstance(v, (int, float))})
        rate = None
        if rows:
            now = time.perf_counter()
            rate = self.tokens / max(now - self.since - self.paused, 1e-9)
            self.tokens, self.since, self.paused = 0, now, 0.0
        for row in rows:
            scalars = by_step.setdefault(int(row["step"]), {})
            scalars.update({f"{self.stage}/{k}": float(v) for k, v in row.items() if k != "step" and v is not None})
            if row is rows[-1]:
                scalars[f"{self.stage}/tokens_per_s"] = rate
        for step in sorted(by_step):
            for tracker in self.trackers:
                tracker.log(by_step[step], step)
        if not rows:
            return
        last = rows[-1]
        loss = "nan" if last.get("loss") is None else f"{last['loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(loss=loss, tok_s=f"{rate:.0f}")
        elif self.plain:
            say(f"{line_prefix()}train {self.stage}: step {last['step']}/{self.total} loss {loss} lr {last['lr']:.3g} "
                f"{rate:.0f} tokens/s", sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
