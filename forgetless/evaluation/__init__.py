"""Forgetting evaluation: perplexity on general text and harness-exact multiple-choice accuracy; any
lm-evaluation-harness task scored by the harness itself (:mod:`forgetless.evaluation.lmeval`, extra ``lmeval``)."""

from forgetless.evaluation.lmeval import HarnessTask, load_harness_task, run_harness
from forgetless.evaluation.multiple_choice import MCResult, evaluate_mc, evaluate_mc_reference
from forgetless.evaluation.perplexity import PerplexityResult, perplexity, perplexity_of_texts

__all__ = [
    "HarnessTask",
    "MCResult",
    "PerplexityResult",
    "evaluate_mc",
    "evaluate_mc_reference",
    "load_harness_task",
    "perplexity",
    "perplexity_of_texts",
    "run_harness",
]
