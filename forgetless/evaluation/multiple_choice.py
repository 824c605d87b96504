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
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from forgetless.progress import progress as show_progress

from forgetless.lm import HeadScorer, _unwrap, eval_mode, model_device
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
    """Context length as ``HFLM.max_length`` finds it (lm-eval's ``resolve_max_length``): the model config's
    ``text_config`` when it has one (Gemma 3, Mistral 3: the top level may hold another modality's limit), else the
    config itself; then the tokenizer."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
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
            raise item.error(f"item {i}: answer {item.answer} out of range for {len(item.choices)} choices", "answer")
        for j, choice in enumerate(item.choices):
            continuation = f"{item.target_delimiter}{choice}"
            # encode_pair is HFLM._encode_pair, including HFLM.loglikelihood's empty-context case
            # (context_enc = [prefix_token_id]).
            ctx_ids, cont_ids = encode_pair(tokenizer, item.context, continuation)
            ctx, cont = list(ctx_ids), list(cont_ids)
            if not cont:
                raise item.error(f"item {i}, choice {j}: the continuation {continuation!r} has no tokens", "choices")
            if len(cont) > max_length:
                raise item.error(f"item {i}, choice {j}: continuation of {len(cont)} tokens is longer than the model's "
                                 f"max_length {max_length}", "choices")
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


@dataclass
class _Packed:
    """One item's requests as one sequence: the inputs' longest common prefix once, then each choice's own tokens.

    ``owner`` is -1 on the prefix and ``j`` on choice ``j``'s tokens; ``positions`` are the tokens' positions in their
    request's own input; ``rows[j]`` are the packed indices whose hidden states score request ``j``'s continuation
    (its input positions ``[inplen - contlen, inplen)``: in the prefix when they fall there)."""

    requests: list[_Request]
    ids: list[int]
    positions: list[int]
    owner: list[int]
    rows: list[list[int]]


def _pack(requests: Sequence[_Request]) -> _Packed:
    inps = [r.inp for r in requests]
    shortest, first = min(len(x) for x in inps), inps[0]
    common = 0
    while common < shortest and all(x[common] == first[common] for x in inps):
        common += 1
    ids, positions, owner, rows = list(first[:common]), list(range(common)), [-1] * common, []
    for j, r in enumerate(requests):
        offset, rest = len(ids), r.inp[common:]
        ids += rest
        positions += range(common, common + len(rest))
        owner += [j] * len(rest)
        inplen, contlen = len(r.inp), len(r.cont)
        rows.append([t if t < common else offset + t - common for t in range(inplen - contlen, inplen)])
    return _Packed(list(requests), ids, positions, owner, rows)


def _packed_batch(packs: Sequence[_Packed]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], position_ids [B, T], mask [B, 1, T, T])`` of packed items, right-padded. A token attends
    to the prefix tokens before it and to its own choice's tokens before it: what it sees in its own request's input,
    at the same positions. Padding attends to itself only (a fully masked row would give NaN in sdpa)."""
    width = max(len(p.ids) for p in packs)
    ids = torch.zeros((len(packs), width), dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    owner = torch.full((len(packs), width), -2, dtype=torch.long)  # -2: padding
    for b, p in enumerate(packs):
        ids[b, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
        positions[b, : len(p.ids)] = torch.tensor(p.positions, dtype=torch.long)
        owner[b, : len(p.ids)] = torch.tensor(p.owner, dtype=torch.long)
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [T(query), T(key)]
    key_prefix = (owner == -1)[:, None, :]
    same = (owner[:, :, None] == owner[:, None, :]) & (owner >= 0)[:, :, None]
    padding = (owner == -2)[:, :, None]
    mask = causal[None] & (key_prefix | same) & ~padding
    mask |= torch.eye(width, dtype=torch.bool)[None] & padding
    return ids, positions, mask[:, None]


def _sharing_possible(model: nn.Module, requests: Sequence[_Request]) -> bool:
    """Shared-prefix scoring needs an attention that takes a custom 4D mask (sdpa; flash-attention takes none) and no
    sliding window the inputs could exceed (the custom mask replaces the window's)."""
    config = getattr(_unwrap(model), "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    return not (isinstance(window, int) and window > 0 and any(len(r.inp) > window for r in requests))


def _score(scorer: HeadScorer, device: torch.device, resolved: str, ids: torch.Tensor, rows: list[int],
           cols: list[int], targets: list[int], lengths: list[int], **inputs: torch.Tensor) -> list[float]:
    """Sum of the continuation tokens' log-probabilities per request: the head at the scored positions only."""
    with autocast(resolved, device):
        hidden = scorer.hidden(ids.to(device), **{k: v.to(device) for k, v in inputs.items()})
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logprobs = F.log_softmax(scorer.logits(picked).float(), dim=-1)
    token_lp = logprobs.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1)
    return [float(part.sum()) for part in torch.split(token_lp, lengths)]


def _score_padded(scorer, device, resolved, reqs: Sequence[_Request]) -> list[float]:
    """One row per request, right-padded (the harness's batches)."""
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
    return _score(scorer, device, resolved, ids, rows, cols, targets, lengths)


def _score_packed(scorer, device, resolved, packs: Sequence[_Packed]) -> list[float]:
    """One row per item (its shared prefix once); the scores in the order of the packs' requests."""
    ids, positions, mask = _packed_batch(packs)
    rows, cols, targets, lengths = [], [], [], []
    for b, p in enumerate(packs):
        for r, picked in zip(p.requests, p.rows, strict=True):
            rows.extend([b] * len(picked))
            cols.extend(picked)
            targets.extend(r.cont)
            lengths.append(len(picked))
    return _score(scorer, device, resolved, ids, rows, cols, targets, lengths, position_ids=positions,
                  attention_mask=mask)


def evaluate_mc(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    precision: str = "auto",
    progress: bool = True,
    share_prefix: bool = False,
) -> MCResult:
    """Harness-exact acc / acc_norm, batched.

    All (item, choice) requests are sorted by input length (longest first, like the harness's
    ``Collator``) and batched with right padding; the output head and log-softmax are applied only
    at the continuation positions (hidden states come from the backbone; full logits if it cannot
    be found).

    ``share_prefix``: each item is one sequence, the choices' common prefix (the context) computed once and each
    choice's own tokens after it, with a 4D attention mask and position ids that give every token exactly what it
    sees in its own request (:class:`_Packed`). The same function of the same inputs, on 1.4x (PIQA) to 4x
    (MedMCQA) fewer tokens with SmolLM2's tokenizer; batches then hold whole items, about ``batch_size`` requests
    each. Equal to the padded path to rounding: in float32 both are within 5e-5 of the one-request-per-forward
    reference; in bf16 both move loglikelihoods by up to ~0.5 nats (batching does too), so scores differ from the
    padded path's at that noise level, which is why it is off by default (recorded results stay comparable). It
    needs sdpa attention (a custom 4D mask) and no sliding window shorter than the inputs, and a probe (once per
    model and precision, :func:`_probe_sharing`) must pass on the first item with several choices; otherwise the
    padded path is used, with a warning.
    """
    if not items:
        raise ValueError("no items to evaluate")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    requests = _build_requests(model, tokenizer, items)
    lls = _empty_lls(items)
    with eval_mode(model), torch.no_grad():
        scorer = HeadScorer(model)
        device = scorer.device
        resolved = resolve_precision(precision, device)
        by_item: dict[int, list[_Request]] = {}
        for r in requests:
            by_item.setdefault(r.item, []).append(r)
        if share_prefix and not (_sharing_possible(model, requests) and _verified(model, scorer, device, resolved,
                                                                               by_item)):
            warnings.warn("share_prefix: this model cannot score multiple choice with a shared prefix (it needs sdpa "
                          "attention with a custom 4D mask and no sliding window shorter than the inputs): one row "
                          "per choice instead", stacklevel=2)
            share_prefix = False
        if share_prefix:
            packs = sorted((_pack(reqs) for reqs in by_item.values()), key=lambda p: (-len(p.ids), tuple(p.ids)))
            batches, current, count = [], [], 0
            for p in packs:
                current.append(p)
                count += len(p.requests)
                if count >= batch_size:
                    batches.append(current)
                    current, count = [], 0
            batches += [current] if current else []
            for batch in show_progress(batches, "multiple choice", unit="batch", enabled=progress):
                scores = _score_packed(scorer, device, resolved, batch)
                for r, score in zip((r for p in batch for r in p.requests), scores, strict=True):
                    lls[r.item][r.choice] = score
        else:
            order = sorted(range(len(requests)), key=lambda k: (-len(requests[k].inp), tuple(requests[k].inp)))
            batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            for batch in show_progress(batches, "multiple choice", unit="batch", enabled=progress):
                reqs = [requests[k] for k in batch]
                for r, score in zip(reqs, _score_padded(scorer, device, resolved, reqs), strict=True):
                    lls[r.item][r.choice] = score
    return _aggregate(items, lls)


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: probe passed}


def _verified(model: nn.Module, scorer: HeadScorer, device: torch.device, resolved: str,
              by_item: dict[int, list[_Request]]) -> bool:
    """:func:`_probe_sharing`, once per model and precision: what it checks is the architecture, which training does
    not change, and a run's evaluations (``eval.every`` included) then all take the same path."""
    seen = _VERIFIED.setdefault(model, {})
    if resolved not in seen:
        verdict = _probe_sharing(scorer, device, resolved, by_item)
        if verdict is None:  # no item here gives a choice tokens of its own (one-token choices: MMLU's letters,
            return True  # BoolQ's no/yes): packed is padded whatever the mask, so pack, and probe a later call
        seen[resolved] = verdict
    return seen[resolved]


def _probe_sharing(scorer: HeadScorer, device: torch.device, resolved: str,
                   by_item: dict[int, list[_Request]]) -> bool | None:
    """Whether the packed path works on this model, on the first item whose choices have inputs of their own (None
    when no item has: with one-token choices every input is the context, and nothing is checked):

    * the mask holds: changing the other choices' own tokens leaves choice 0's score bit for bit as it was (masked
      keys get weight exactly 0; an attention that ignored the custom mask would let choice 0 see nothing else either,
      so choice 1 is checked the same way, against changes of choice 0's tokens);
    * the scores agree with the padded path's to rounding (float32: 1e-4 + 1e-5 |ll|; bf16 and fp16, whose rounding
      alone moves a loglikelihood by up to ~0.5 nats between batch layouts: 1 nat + 5 %), which catches ignored
      position ids (in float32 surely; in bf16 only where they move the scores by more than rounding does)."""
    reqs = next((r for r in by_item.values() if len({tuple(q.inp) for q in r}) > 1), None)
    if reqs is None:
        return None
    try:
        pack = _pack(reqs)
        packed = _score_packed(scorer, device, resolved, [pack])
        for keep in (0, 1):
            changed = _Packed(pack.requests, [t if o in (-1, keep) else (t + 1) % max(2, max(pack.ids) + 1)
                                              for t, o in zip(pack.ids, pack.owner)], pack.positions, pack.owner,
                              pack.rows)
            if _score_packed(scorer, device, resolved, [changed])[keep] != packed[keep]:
                return False
    except Exception:  # noqa: BLE001 - any failure: the padded path
        return False
    padded = _score_padded(scorer, device, resolved, reqs)
    slack = (1e-4, 1e-5) if resolved == "fp32" else (1.0, 0.05)
    return all(math.isfinite(a) and abs(a - b) <= slack[0] + slack[1] * abs(b)
               for a, b in zip(packed, padded, strict=True))


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
