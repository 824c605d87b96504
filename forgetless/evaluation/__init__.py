"""Forgetting evaluation: perplexity on general text and harness-exact multiple-choice accuracy."""

from forgetless.evaluation.multiple_choice import MCResult, evaluate_mc, evaluate_mc_reference
from forgetless.evaluation.perplexity import PerplexityResult, perplexity, perplexity_of_texts

__all__ = [
    "MCResult",
    "PerplexityResult",
    "evaluate_mc",
    "evaluate_mc_reference",
    "perplexity",
    "perplexity_of_texts",
]
