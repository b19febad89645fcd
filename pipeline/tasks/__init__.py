"""What differs between the three tasks a model can be trained for, in one place: Binary, Multiclass, Multilabel.

`task_for(data.task, labels)` picks one once (from params, a checkpoint, metrics.json or a model's metadata); the
stages then ask it and never branch on the task themselves, as torchmetrics' Binary/Multiclass/MultilabelAUROC
each own their formula and the code that uses them does not care which it holds.

- Binary: two labels, the last is positive; a 2-way softmax; the positive label's probability is called
  positive at a threshold chosen on validation; the full table (AUC, accuracy, sensitivity, ...) at it.
- Multiclass: three or more classes, one per film; a softmax; the most probable class is the prediction.
  `auc` is the macro one-vs-rest AUC, `accuracy` that of the most probable class; plus a confusion matrix and
  each class's one-vs-rest metrics.
- Multilabel: two or more findings, any number per film, none included; a sigmoid per label; one threshold per
  label chosen on validation. `auc` is the macro AUC over labels, `accuracy` the mean per-label accuracy at
  those thresholds; plus each label's table at its threshold.
`auc` and `accuracy` mean the same to the champion gate in every task.

The manifest writes a binary or multiclass film's class as `label` and its position in the labels as
`label_index`; a multilabel film's `label` is its set joined by '|' (pipeline.labels) and `label_index` is -1.

One file per task (binary.py, multiclass.py, multilabel.py) and the interface they share (base.py). Only numpy
and pandas are imported at the top (torch and scikit-learn inside the methods that need them): the served model
(pipeline.serving) imports this package too.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import CxrError
from pipeline.tasks.base import ExampleFilms, LabelBalance, Scored, Task, Threshold
from pipeline.tasks.binary import Binary
from pipeline.tasks.multiclass import Multiclass
from pipeline.tasks.multilabel import Multilabel

__all__ = ["TASKS", "Binary", "ExampleFilms", "LabelBalance", "Multiclass", "Multilabel", "Scored", "Task", "Threshold", "task_for"]

TASKS: dict[str, type[Task]] = {task.name: task for task in (Binary, Multiclass, Multilabel)}


def task_for(name: str, labels: Sequence[str]) -> Task:
    """The task object for data.task `name` (or a checkpoint's or model's recorded task) and its labels."""
    if name not in TASKS:
        raise CxrError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    return TASKS[name](labels)
