"""Tasks, their classes, and the rules that map hierarchical findings to classes.

A finding is a path such as ``Pneumonia/Viral/COVID-19``: level 1 is the disease,
level 2 the coarse etiology (bacterial, viral, fungal) and the last level the fine
label (genus or named virus: :meth:`Task.organism`, the etiology task's fine level). Each task turns a finding, or a plain class name such
as ``PNEUMONIA`` (folder names of the public pediatric dataset), into one of its
classes, or ``None`` when the task cannot place it (for instance ARDS for the
etiology task). Callers count what maps to ``None``; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pneumobatch.core.hierarchy import organism

NORMAL_FINDINGS = {"no finding", "normal", "no-finding", "healthy"}


def _levels(label: str) -> list[str]:
    return [part.strip().lower() for part in str(label).split("/") if part.strip()]


def _finding_rule(disease: Callable[[list[str]], Optional[str]]) -> Callable[[str], Optional[str]]:
    """A label rule: a normal finding maps to ``normal``, any other to ``disease(levels)``."""

    def rule(label: str) -> Optional[str]:
        levels = _levels(label)
        if not levels:
            return None
        return "normal" if levels[0] in NORMAL_FINDINGS else disease(levels)

    return rule


@_finding_rule
def _pneumonia(levels: list[str]) -> Optional[str]:
    if levels[0] == "pneumonia" or levels[-1] in {"bacterial", "viral", "fungal", "covid-19"}:
        return "pneumonia"
    return None


@_finding_rule
def _etiology(levels: list[str]) -> Optional[str]:
    if "covid-19" in levels:  # fine level wins over its coarse parent (viral)
        return "covid-19"
    if levels[0] == "pneumonia" and len(levels) >= 2:
        coarse = levels[1]
    elif len(levels) == 1:
        coarse = levels[0]  # plain class name such as "bacterial"
    else:
        return None
    return coarse if coarse in {"bacterial", "viral", "fungal"} else None


def _covid(label: str) -> Optional[str]:
    levels = _levels(label)
    if not levels:
        return None
    if "covid-19" in levels:
        return "covid-19"
    if levels in (["not-covid"], ["non-covid"], ["not covid"]):
        return "not-covid"
    if _pneumonia(label) is not None:
        return "not-covid"
    return None


@dataclass(frozen=True)
class Task:
    """A classification task: its classes, the positive class and the label rule."""

    name: str
    classes: tuple[str, ...]
    positive: Optional[str]  # the class a binary threshold is applied to
    rule: Callable[[str], Optional[str]]
    description: str
    #: whether the task's models also predict the organism below each class (:mod:`pneumobatch.core.hierarchy`)
    hierarchical: bool = False

    def organism(self, label: object) -> Optional[str]:
        """The organism a hierarchical finding names below its class (``Pneumonia/Bacterial/Streptococcus``
        -> ``Streptococcus``), or None (no organism, or the organism is the class itself: COVID-19)."""
        if not self.hierarchical or label is None or (isinstance(label, float) and label != label):
            return None
        found = organism(str(label).split("/"))
        cls = self.map_label(label)
        if found is None or cls is None or found.lower() == cls.lower():
            return None
        return found

    def map_label(self, label: object) -> Optional[str]:
        """Return the class for a label or finding, or ``None`` if it has no place here."""
        if label is None or (isinstance(label, float) and label != label):
            return None
        text = str(label).strip()
        if not text:
            return None
        lowered = text.lower()
        for cls in self.classes:  # a class name itself always maps, case-insensitively
            if lowered == cls.lower():
                return cls
        found = self.rule(text)
        return found if found in self.classes else None  # an older card's task may lack a class of the rule


TASKS: dict[str, Task] = {
    "pneumonia": Task(
        "pneumonia",
        ("normal", "pneumonia"),
        "pneumonia",
        _pneumonia,
        "normal vs pneumonia of any cause",
    ),
    "etiology": Task(
        "etiology",
        ("normal", "bacterial", "viral", "fungal", "covid-19"),
        None,
        _etiology,
        "normal / bacterial / viral (non-COVID) / fungal / COVID-19 pneumonia, and the organism below each",
        hierarchical=True,
    ),
    "covid": Task("covid", ("not-covid", "covid-19"), "covid-19", _covid, "COVID-19 vs not"),
}


def get_task(name: str) -> Task:
    """Return a built-in task by name; raises ``KeyError`` listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}, custom") from None


def custom_task(classes: list[str]) -> Task:
    """A task whose classes are the distinct values of a label column."""
    classes = tuple(sorted({str(c).strip() for c in classes if str(c).strip()}))
    positive = classes[1] if len(classes) == 2 else None
    return Task("custom", classes, positive, lambda label: None, "classes from the label column")


def task_from_card(name: str, classes: list[str]) -> Task:
    """The task a model card describes; custom tasks are rebuilt from their classes."""
    if name in TASKS and list(TASKS[name].classes) == list(classes):
        return TASKS[name]
    if name in TASKS and set(classes) <= set(TASKS[name].classes):  # an older card of the task (etiology v0.3)
        known = TASKS[name]
        return Task(name, tuple(classes), known.positive, known.rule, known.description, known.hierarchical)
    task = custom_task(classes)
    return Task(name, tuple(classes), task.positive, task.rule, task.description)
