"""Data of the offline demo: a domain multiple-choice task about an invented island.

The domain is the herbal lore of the fictional *Isle Corvath*: a table of facts
(``forgetless/data/demo/facts.tsv``) about invented plants -- what each one
treats, where it grows, the colour it blooms in and who harvests it. No
pretrained model can know these facts, so a base model answers at chance and
any gain after fine-tuning is learned knowledge.

Questions are generated from the table. The ``"train"`` and ``"test"`` splits
ask about the *same* facts with *different* wording, so the test split
measures whether the facts were learned rather than the training phrasing.
Distractors are other values of the same relation, so every choice is a
plausible answer to the question.

Alongside the domain task the module holds the general-text material of the
demo: opening sentences from which general text is sampled from the base model
(:func:`demo_general_prompts`) and a short held-out English text for perplexity
(:data:`DEMO_HELDOUT_TEXT`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from forgetless.data.multiple_choice import MCItem

__all__ = [
    "DEMO_HELDOUT_TEXT",
    "DEMO_TEMPLATES",
    "Fact",
    "demo_general_prompts",
    "demo_task",
    "load_facts",
    "relation_values",
]

SPLITS = ("train", "test")

#: Question templates per relation and split; ``{entity}`` is replaced by the
#: entity name and the continuation is ``" " + value``.
DEMO_TEMPLATES: dict[str, dict[str, str]] = {
    "treats": {
        "train": "In the herbal lore of Isle Corvath, {entity} is used to treat the",
        "test": "Question: Which part of the body does the Corvath herb {entity} heal?\nAnswer:",
    },
    "grows in": {
        "train": "On Isle Corvath, the plant {entity} grows only in the",
        "test": "Question: In what kind of place does the Corvath plant {entity} grow?\nAnswer:",
    },
    "blooms": {
        "train": "When {entity} flowers on Isle Corvath, its blossoms are",
        "test": "Question: What colour are the flowers of the Corvath plant {entity}?\nAnswer:",
    },
    "is harvested by": {
        "train": "By old custom on Isle Corvath, {entity} may be gathered only by",
        "test": "Question: Who gathers {entity} on Isle Corvath?\nAnswer:",
    },
}


@dataclass(frozen=True)
class Fact:
    """One row of the fact table: ``entity`` ``relation`` ``value``."""

    entity: str
    relation: str
    value: str


def _default_facts_path():
    return files("forgetless.data") / "demo" / "facts.tsv"


def load_facts(path: str | Path | None = None) -> list[Fact]:
    """Read and validate the fact table (the packaged one unless ``path`` is given).

    Rows are ``entity<TAB>relation<TAB>value``; blank lines and lines starting
    with ``#`` are ignored. A row with the wrong number of fields, an empty
    field, an unknown relation or a repeated (entity, relation) pair raises
    :class:`ValueError` naming the file and line number.
    """
    source = Path(path) if path is not None else _default_facts_path()
    text = source.read_text(encoding="utf-8")
    facts: list[Fact] = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{source}: line {lineno}"
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{where}: expected 3 tab-separated fields "
                f"(entity, relation, value), got {len(fields)}: {line!r}"
            )
        entity, relation, value = (f.strip() for f in fields)
        if not entity or not relation or not value:
            raise ValueError(f"{where}: empty field in {line!r}")
        if relation not in DEMO_TEMPLATES:
            raise ValueError(
                f"{where}: unknown relation {relation!r} "
                f"(known: {', '.join(sorted(DEMO_TEMPLATES))})"
            )
        key = (entity, relation)
        if key in seen:
            raise ValueError(
                f"{where}: duplicate fact for {entity!r} {relation!r} "
                f"(first given on line {seen[key]})"
            )
        seen[key] = lineno
        facts.append(Fact(entity, relation, value))
    if not facts:
        raise ValueError(f"{source}: no facts found")
    return facts


def relation_values(facts: list[Fact]) -> dict[str, list[str]]:
    """The closed set of values of each relation, in order of first appearance."""
    values: dict[str, list[str]] = {}
    for fact in facts:
        vals = values.setdefault(fact.relation, [])
        if fact.value not in vals:
            vals.append(fact.value)
    return values


def demo_task(
    split: str,
    seed: int = 0,
    n_choices: int = 4,
    facts: list[Fact] | None = None,
) -> list[MCItem]:
    """Multiple-choice questions, one per fact, with the split's wording.

    ``split`` is ``"train"`` or ``"test"``: both cover the same facts in the
    same order but use different question templates. Each item has
    ``n_choices`` one-word choices: the true value and ``n_choices - 1`` other
    values of the same relation, with the position of the answer shuffled.
    Distractors and positions are a deterministic function of ``seed``,
    ``split`` and the fact.
    """
    from forgetless.data.multiple_choice import MCItem

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if facts is None:
        facts = load_facts()
    values = relation_values(facts)
    smallest = min(len(v) for v in values.values())
    if not 2 <= n_choices <= smallest:
        raise ValueError(
            f"n_choices must be between 2 and {smallest} "
            f"(the fewest values of any relation), got {n_choices}"
        )
    items: list[MCItem] = []
    for fact in facts:
        rng = random.Random(f"{seed}|{split}|{fact.entity}|{fact.relation}")
        others = [v for v in values[fact.relation] if v != fact.value]
        choices = rng.sample(others, n_choices - 1)
        answer = rng.randrange(n_choices)
        choices.insert(answer, fact.value)
        context = DEMO_TEMPLATES[fact.relation][split].format(entity=fact.entity)
        items.append(MCItem(context=context, choices=tuple(choices), answer=answer))
    return items


_GENERAL_PROMPTS = (
    "The city council met on Tuesday evening to discuss",
    "Scientists studying the migration of birds have found that",
    "To make a simple tomato sauce, start by",
    "In the early years of the nineteenth century, the railway",
    "The weather forecast for the weekend suggests",
    "Most people who learn to play the piano as adults",
    "The local library has announced that starting next month",
    "When water is heated in a closed container,",
    "The history of the printing press begins in",
    "A good night's sleep is important because",
    "The football match ended in a draw after",
    "Farmers in the valley have been worried about",
    "One of the easiest ways to save money on groceries is",
    "The museum's new exhibition about ancient Egypt",
    "Electric cars have become more common in recent years, and",
    "My grandmother always said that the secret to good bread",
)


def demo_general_prompts() -> list[str]:
    """Ordinary English openings from which the demo samples general text."""
    return list(_GENERAL_PROMPTS)


#: Held-out ordinary English text (written for this project) for perplexity.
DEMO_HELDOUT_TEXT: str = """\
Every town has a rhythm of its own, and it is easiest to notice early in the \
morning. Before the shops open, delivery vans park along the main street and \
drivers carry crates of bread, milk and fresh vegetables through back doors. \
A few people walk their dogs, others hurry to catch the first bus, and the \
smell of coffee drifts out of the bakery on the corner. By nine o'clock the \
pavements are busy, and the quiet hour is already hard to remember.

Cooking at home does not need to be complicated. A pot of soup can be made \
from whatever is left in the kitchen: an onion, a couple of carrots, some \
potatoes and a handful of lentils. Fry the onion slowly in a little oil until \
it is soft, add the chopped vegetables and enough water or stock to cover \
them, and let everything simmer for half an hour. Season it with salt and \
pepper, and serve it with a slice of bread. It is cheap, warm and filling, \
and it tastes even better the next day.

Rivers have shaped the history of many countries. Early settlements grew up \
beside them because they offered water for drinking and farming, fish to \
eat, and an easy way to move goods from one place to another. Over time, \
bridges were built, mills were placed along the banks, and small villages \
became busy market towns. Floods were a constant danger, however, and people \
learned to build their houses on higher ground and to keep records of the \
seasons when the water rose.

Learning a new skill as an adult can feel slow at first. Whether it is a \
language, a musical instrument or a sport, the early weeks are often full of \
mistakes. Teachers usually recommend practising a little every day rather \
than a lot once a week, because short and regular sessions help the memory \
hold on to what has been learned. Progress is rarely steady, but after a few \
months most learners are surprised by how far they have come.

In the evening, when the work is done, many families gather around the table \
to share a meal and talk about their day. Children describe what happened at \
school, parents mention news from their jobs, and plans are made for the \
weekend. These ordinary conversations may seem unimportant, yet they are \
often the moments that people remember most fondly years later.
"""
