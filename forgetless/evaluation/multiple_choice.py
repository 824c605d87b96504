"""Zero-shot multiple-choice accuracy, scored exactly as EleutherAI's lm-evaluation-harness does.

For each item and each choice ``j`` the harness asks for the loglikelihood of the continuation
``target_delimiter + choices[j]`` given the context (``ConfigurableTask.construct_requests``,
lm_eval/api/task.py: ``arguments = [(ctx, f"{target_delimiter}{cont}") for cont in choices]``), then
in ``ConfigurableTask.process_results`` for ``multiple_choice``::

    completion_len = np.array([float(len(i)) for i in choices])   # choices = doc_to_choice(doc)
    pred = np.argmax(lls);  pred_norm = np.argmax(lls / completion_len)
    acc = 1.0 if pred == gold else 0.0;  acc_norm = 1.0 if pred_norm == gold else 0.0

``choices`` there are the raw choice strings from ``doc_to_choice``, so the length used by
``acc_norm`` is ``len(choice)`` in characters WITHOUT the target delimiter; we do the same.

Loglikelihoods follow ``HFLM._loglikelihood_tokens`` (lm_eval/models/huggingface.py): the model input
is ``(context_enc + continuation_enc)[-(max_length + 1):][:-1]``, and the log-softmax rows
``[inplen - contlen : inplen]`` are gathered at the continuation tokens and summed. An empty context
is replaced by ``[prefix_token_id]`` (``HFLM.loglikelihood``; ``forgetless.data.encode_pair`` does
it). The harness also sorts requests by descending total length and right-pads batches with zeros,
which is exact for a causal model: pad tokens come after every real token, so no real position
attends to them.

The stderr of a mean is the harness's ``mean_stderr`` (lm_eval/api/metrics.py): sample standard
deviation (``n - 1`` denominator) divided by ``sqrt(n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from forgetless.progress import progress as show_progress

from forgetless.lm import HeadScorer, eval_mode, model_device
from forgetless.precision import autocast, resolve_precision

if TYPE_CHECKING:
    from forgetless.data import MCItem

# transformers' "no limit" sentinel for tokenizer.model_max_length (the harness checks it too).
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_DEFAULT_MAX_LENGTH = 2048


@dataclass
class MCResult:
    """Accuracies over ``n`` items, their stderrs, and per item the per-choice loglikelihoods."""

    acc: float
    acc_norm: float
    n: int
    acc_stderr: float
    acc_norm_stderr: float
    loglikelihoods: list[list[float]]


@dataclass
class _Request:
    item: int
    choice: int
    inp: list[int]  # model input: (ctx + cont)[-(max_length + 1):][:-1]
    cont: list[int]  # continuation token ids (the targets)


def _max_length(model: nn.Module, tokenizer) -> int:
    """Context length as ``HFLM.max_length`` finds it: model config first, then the tokenizer."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _TOKENIZER_INFINITY:
        return value
    return _DEFAULT_MAX_LENGTH


def _build_requests(model: nn.Module, tokenizer, items: Sequence[MCItem]) -> list[_Request]:
    from forgetless.data import encode_pair  # lazy: keeps the data stack off the import path

    max_length = _max_length(model, tokenizer)
    requests = []
    for i, item in enumerate(items):
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"item {i}: answer {item.answer} out of range for {len(item.choices)} choices")
        for j, choice in enumerate(item.choices):
            continuation = f"{item.target_delimiter}{choice}"
            # encode_pair is HFLM._encode_pair, including HFLM.loglikelihood's empty-context case
            # (context_enc = [prefix_token_id]).
            ctx_ids, cont_ids = encode_pair(tokenizer, item.context, continuation)
            ctx, cont = list(ctx_ids), list(cont_ids)
            if not cont:
                raise ValueError(f"item {i}, choice {j}: the continuation {continuation!r} has no tokens")
            if len(cont) > max_length:
                raise ValueError(f"item {i}, choice {j}: continuation longer than max_length {max_length}")
            requests.append(_Request(i, j, (ctx + cont)[-(max_length + 1) :][:-1], cont))
    return requests


def _mean_stderr(values: Sequence[float]) -> float:
    """lm_eval.api.metrics.mean_stderr: sample_stddev(arr) / sqrt(len(arr)); NaN for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _aggregate(items: Sequence[MCItem], lls: list[list[float]]) -> MCResult:
    """acc / acc_norm as in ``ConfigurableTask.process_results`` (see the module docstring)."""
    accs, norms = [], []
    for item, item_lls in zip(items, lls, strict=True):
        scores = np.asarray(item_lls, dtype=np.float64)
        completion_len = np.array([float(len(c)) for c in item.choices])  # no target delimiter
        accs.append(1.0 if int(np.argmax(scores)) == item.answer else 0.0)
        norms.append(1.0 if int(np.argmax(scores / completion_len)) == item.answer else 0.0)
    n = len(items)
    return MCResult(
        acc=sum(accs) / n,
        acc_norm=sum(norms) / n,
        n=n,
        acc_stderr=_mean_stderr(accs),
        acc_norm_stderr=_mean_stderr(norms),
        loglikelihoods=lls,
    )


def _empty_lls(items: Sequence[MCItem]) -> list[list[float]]:
    return [[math.nan] * len(item.choices) for item in items]


def evaluate_mc(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    precision: str = "auto",
    progress: bool = True,
) -> MCResult:
    """Harness-exact acc / acc_norm, batched.

    All (item, choice) requests are sorted by input length (longest first, like the harness's
    ``Collator``) and batched with right padding; the output head and log-softmax are applied only
    at the continuation positions (hidden states come from the backbone; full logits if it cannot
    be found).
    """
    if not items:
        raise ValueError("no items to evaluate")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    requests = _build_requests(model, tokenizer, items)
    order = sorted(range(len(requests)), key=lambda k: (-len(requests[k].inp), tuple(requests[k].inp)))
    lls = _empty_lls(items)
    with eval_mode(model), torch.no_grad():
        scorer = HeadScorer(model)
        device = scorer.device
        resolved = resolve_precision(precision, device)
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in show_progress(batches, "multiple choice", unit="batch", enabled=progress):
            reqs = [requests[k] for k in batch]
            width = max(len(r.inp) for r in reqs)
            ids = torch.zeros((len(reqs), width), dtype=torch.long)
            rows, cols, targets, lengths = [], [], [], []
            for b, r in enumerate(reqs):
                ids[b, : len(r.inp)] = torch.tensor(r.inp, dtype=torch.long)
                inplen, contlen = len(r.inp), len(r.cont)
                # harness _select_cont_toks: logits[inplen - contlen : inplen]
                rows.extend([b] * contlen)
                cols.extend(range(inplen - contlen, inplen))
                targets.extend(r.cont)
                lengths.append(contlen)
            with autocast(resolved, device):
                hidden = scorer.hidden(ids.to(device))
                picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
                logprobs = F.log_softmax(scorer.logits(picked).float(), dim=-1)
            token_lp = logprobs.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1)
            for r, part in zip(reqs, torch.split(token_lp, lengths), strict=True):
                lls[r.item][r.choice] = float(part.sum())
    return _aggregate(items, lls)


def evaluate_mc_reference(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCItem],
    precision: str = "auto",
) -> MCResult:
    """Ground truth for ``evaluate_mc``: one full-logits forward per (item, choice), no batching."""
    if not items:
        raise ValueError("no items to evaluate")
    requests = _build_requests(model, tokenizer, items)
    lls = _empty_lls(items)
    with eval_mode(model), torch.no_grad():
        device = model_device(model)
        resolved = resolve_precision(precision, device)
        for r in requests:
            inp = torch.tensor([r.inp], dtype=torch.long, device=device)
            with autocast(resolved, device):
                logits = model(input_ids=inp, use_cache=False).logits[0]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            inplen, contlen = len(r.inp), len(r.cont)
            cont_lp = logprobs[inplen - contlen : inplen]
            target = torch.tensor(r.cont, dtype=torch.long, device=device).unsqueeze(1)
            lls[r.item][r.choice] = float(cont_lp.gather(1, target).sum())
    return _aggregate(items, lls)
