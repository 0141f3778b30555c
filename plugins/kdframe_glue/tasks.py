"""The GLUE tasks: what each one is (TaskInfo) and where its data lives (TSV columns, hub config)."""

from __future__ import annotations

from dataclasses import dataclass

from kdframe.api import DataError, TaskInfo

HUB_ID = "nyu-mll/glue"
SPLITS = ("train", "dev")


@dataclass(frozen=True)
class GlueTask:
    info: TaskInfo
    folder: str  # <glue_dir>/<folder>/<split>.tsv
    hub_config: str
    text_at: tuple[int, ...]  # TSV columns of text_a (and text_b), as in transformers' glue processors
    label_at: int  # TSV column of the label; -1 is the last (MNLI rows grow with the annotator labels)
    headerless_columns: int | None = None  # CoLA has no header; others take the count from theirs
    dev: str = "dev"  # file stem of the dev split
    hub_dev: str = "validation"

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"{self.info.name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    def file_name(self, split: str) -> str:
        return f"{self.dev if split == 'dev' else split}.tsv"

    def hub_split(self, split: str) -> str:
        return self.hub_dev if split == "dev" else split


def _info(name: str, labels: tuple[str, ...], metrics: tuple[str, ...], main: str,
          text: tuple[str, ...], names: tuple[str, ...] = ()) -> TaskInfo:
    # Labels are the TSV values in the id order of nyu-mll/glue's ClassLabel, so ids agree on both
    # paths; names are that ClassLabel's names, which exported models show.
    return TaskInfo(name, num_labels=len(labels) or 1, metrics=metrics, main_metric=main,
                    text_columns=text, labels=labels, label_names=names)


_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")
_PAIR = ("sentence1", "sentence2")
_MNLI_TEXT = ("premise", "hypothesis")

TASKS: dict[str, GlueTask] = {task.info.name: task for task in (
    GlueTask(_info("cola", _BINARY, ("matthews",), "matthews", ("sentence",), ("unacceptable", "acceptable")),
             "CoLA", "cola", (3,), 1, headerless_columns=4),
    GlueTask(_info("sst2", _BINARY, ("accuracy",), "accuracy", ("sentence",), ("negative", "positive")),
             "SST-2", "sst2", (0,), 1),
    GlueTask(_info("mrpc", _BINARY, ("f1", "accuracy"), "f1", _PAIR, ("not_equivalent", "equivalent")),
             "MRPC", "mrpc", (3, 4), 0),
    GlueTask(_info("qqp", _BINARY, ("f1", "accuracy"), "f1", ("question1", "question2"), ("not_duplicate", "duplicate")),
             "QQP", "qqp", (3, 4), 5),
    GlueTask(_info("stsb", (), ("pearson", "spearman"), "spearman", _PAIR), "STS-B", "stsb", (7, 8), -1),
    GlueTask(_info("mnli", _NLI3, ("accuracy",), "accuracy", _MNLI_TEXT), "MNLI", "mnli", (8, 9), -1,
             dev="dev_matched", hub_dev="validation_matched"),
    GlueTask(_info("mnli-mm", _NLI3, ("accuracy",), "accuracy", _MNLI_TEXT), "MNLI", "mnli", (8, 9), -1,
             dev="dev_mismatched", hub_dev="validation_mismatched"),
    GlueTask(_info("qnli", _ENTAIL, ("accuracy",), "accuracy", ("question", "sentence")), "QNLI", "qnli",
             (1, 2), -1),
    GlueTask(_info("rte", _ENTAIL, ("accuracy",), "accuracy", _PAIR), "RTE", "rte", (1, 2), -1),
    GlueTask(_info("wnli", _BINARY, ("accuracy",), "accuracy", _PAIR, ("not_entailment", "entailment")),
             "WNLI", "wnli", (1, 2), -1),
)}
