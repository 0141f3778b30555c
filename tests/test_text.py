"""kdframe_text: the generic text source (files, save_to_disk, hub), its task keys, bad input, and
the metrics every task uses.

Each reading is compared with an independent one: the csv and json modules, pyarrow's Parquet
reader, and the tokenizer called on plain lists.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from robustness.robust_helpers import assert_bad_input, kd, smoke_raw, write_recipe
from scipy import stats

import kdframe_text as text
from kdframe.api import DataError, RecipeError, TaskInfo
from kdframe.recipe import DataSpec
from kdframe_text.metrics import METRICS
from kdframe_text.params import METRIC_NAMES, TextParams, task_info

ROWS = [("a fine film", "pos", "x"), ("dull and slow", "neg", "y"), ("\"quoted\" start", "pos", "x"),
        ("tab-free, comma, text", "neg", "x"), ("the end", "pos", "y")]


def params(**keys) -> TextParams:
    keys = {"text_columns": ["text"], "label_column": "sentiment", "labels": ["neg", "pos"], **keys}
    return TextParams(**keys)


def load(p: TextParams, split: str, tokenizer, cache: Path, task: str = "reviews", **data):
    spec = DataSpec(task=task, source="text", params=p, **data)
    return text.kdframe_load_data(data=spec, task=task_info(task, p), split=split, tokenizer=tokenizer,
                                  cache_dir=str(cache))


def columns(split) -> tuple[list, list, list]:
    table = split.table
    return (table.column("input_ids").to_pylist(), table.column("token_type_ids").to_pylist(),
            table.column("labels").to_pylist())


def expected(tokenizer, texts: list[str], labels: list, pairs: list[str] | None = None):
    encoded = tokenizer(texts, *([pairs] if pairs else []), truncation=True, max_length=128)
    return encoded["input_ids"], encoded["token_type_ids"], labels


def write_csv(path: Path, rows, header=("text", "sentiment", "origin"), delimiter=",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows, header=("text", "sentiment", "origin")) -> Path:
    path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows, header=("text", "sentiment", "origin")) -> Path:
    pq.write_table(pa.table({name: [row[i] for row in rows] for i, name in enumerate(header)}), path)
    return path


# -- reading: the same examples as an independent reading -------------------------------------

@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_files_read_like_a_plain_reading(kind: str, tokenizer, tmp_path: Path) -> None:
    writers = {"csv": write_csv, "tsv": lambda p, r: write_csv(p, r, delimiter="\t"), "jsonl": write_jsonl,
               "parquet": write_parquet}
    train = writers[kind](tmp_path / f"train.{kind}", ROWS)
    dev = writers[kind](tmp_path / f"dev.{kind}", ROWS[:2])
    p = params(train_file=str(train), dev_file=str(dev))
    # The reference: the csv module (TSV without quoting), json, or pyarrow.parquet.
    if kind in ("csv", "tsv"):
        with train.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else csv.reader(f)
            rows = list(reader)[1:]
    elif kind == "jsonl":
        rows = [list(json.loads(line).values()) for line in train.read_text().splitlines()]
    else:
        rows = [list(r.values()) for r in pq.read_table(train).to_pylist()]
    reference = expected(tokenizer, [r[0] for r in rows], [["neg", "pos"].index(r[1]) for r in rows])
    loaded = load(p, "train", tokenizer, tmp_path / "cache")
    assert columns(loaded) == reference
    assert loaded.source == str(train) and len(load(p, "dev", tokenizer, tmp_path / "cache")) == 2


def test_save_to_disk_directory_and_class_labels(tokenizer, tmp_path: Path) -> None:
    """A DatasetDict on disk, its label a ClassLabel: ids map through its names to the label set."""
    feature = datasets.Features({"text": datasets.Value("string"),
                                 "sentiment": datasets.ClassLabel(names=["positive", "negative"])})
    splits = {"train": [r[0] for r in ROWS], "validation": ["so so"]}
    gold = {"train": [0 if r[1] == "pos" else 1 for r in ROWS], "validation": [1]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts, "sentiment": gold[name]}, features=feature)
                          for name, texts in splits.items()}).save_to_disk(str(tmp_path / "saved"))
    # The recipe's label set is in another order than the ClassLabel's: names decide, not ids.
    p = params(dataset=str(tmp_path / "saved"), labels=["negative", "positive"])
    loaded = load(p, "train", tokenizer, tmp_path / "cache")
    assert columns(loaded) == expected(tokenizer, splits["train"], [1 - y for y in gold["train"]])
    assert columns(load(p, "dev", tokenizer, tmp_path / "cache"))[2] == [0]
    with pytest.raises(DataError, match=r"no split 'test'; it has train, validation"):
        load(params(dataset=str(tmp_path / "saved"), labels=["negative", "positive"], dev_split="test"), "dev",
             tokenizer, tmp_path / "cache")


def test_sentence_pairs_and_regression(tokenizer, tmp_path: Path) -> None:
    rows = [("a b", "c", 0.5), ("d", "e f", 4.75), ("g", "h", 3)]
    train = write_csv(tmp_path / "pairs.csv", rows, header=("left", "right", "score"))
    p = TextParams(train_file=str(train), dev_file=str(train), text_columns=["left", "right"], label_column="score",
                   score_range=[0, 5], metrics=["spearman", "pearson"])
    info = task_info("sts", p)
    assert info.is_regression and info.main_metric == "spearman" and info.text_columns == ("left", "right")
    loaded = load(p, "train", tokenizer, tmp_path / "cache", task="sts")
    assert columns(loaded) == expected(tokenizer, ["a b", "d", "g"], [0.5, 4.75, 3.0], pairs=["c", "e f", "h"])
    assert loaded.labels().dtype == np.float32


def test_dev_fraction_is_seeded_disjoint_and_complete(tokenizer, tmp_path: Path) -> None:
    rows = [(f"text {i}", "pos" if i % 2 else "neg", "x") for i in range(40)]
    train = write_csv(tmp_path / "all.csv", rows)

    def texts(split, seed):
        p = params(train_file=str(train), dev_fraction=0.25, split_seed=seed)
        ids = columns(load(p, split, tokenizer, tmp_path / "cache"))[0]
        return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]

    dev, rest = texts("dev", 0), texts("train", 0)
    assert len(dev) == 10 and len(rest) == 30 and not set(dev) & set(rest)
    assert sorted(dev + rest) == sorted(tokenizer.decode(tokenizer(r[0])["input_ids"], skip_special_tokens=True)
                                       for r in rows)
    assert texts("dev", 0) == dev and texts("dev", 1) != dev  # the seed, and only the seed, decides


def test_where_keeps_rows_and_errors_name_file_rows(tokenizer, tmp_path: Path) -> None:
    rows = [*ROWS, ("odd one", "maybe", "z")]  # an unknown label, in a row `where` drops
    train = write_csv(tmp_path / "train.csv", rows)
    p = params(train_file=str(train), dev_file=str(train), where={"origin": ["x"]})
    kept = [r for r in ROWS if r[2] == "x"]
    assert columns(load(p, "train", tokenizer, tmp_path / "cache")) == expected(
        tokenizer, [r[0] for r in kept], [["neg", "pos"].index(r[1]) for r in kept])
    with pytest.raises(DataError, match=rf"^{train}: row 6: label 'maybe' is not in data.labels \(neg, pos\)$"):
        load(params(train_file=str(train), dev_file=str(train)), "train", tokenizer, tmp_path / "cache")
    with pytest.raises(DataError, match="data.where keeps no row"):
        load(params(train_file=str(train), dev_file=str(train), where={"origin": ["nothing"]}), "train", tokenizer,
             tmp_path / "cache")


def test_integer_labels_compare_as_text(tokenizer, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [("a", 1, "x"), ("b", 0, "x")])
    p = params(train_file=str(train), dev_file=str(train), labels=["0", "1"])
    assert columns(load(p, "train", tokenizer, tmp_path / "cache"))[2] == [1, 0]


def test_package_path(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "reviewdata"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('package: paths must not import the package')\n")
    write_csv(package / "data" / "all.csv", ROWS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    p = params(train_file="package:reviewdata/data/all.csv", dev_fraction=0.4)
    assert len(load(p, "train", tokenizer, tmp_path / "cache")) == 3
    with pytest.raises(DataError, match="no installed package 'nosuchpackage'"):
        load(params(train_file="package:nosuchpackage/x.csv", dev_fraction=0.4), "train", tokenizer, tmp_path / "c")


def test_tokens_are_cached_by_content(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = write_csv(tmp_path / "train.csv", ROWS)
    p = params(train_file=str(train), dev_file=str(train))
    first = columns(load(p, "train", tokenizer, tmp_path / "cache"))

    def fail(*args):
        raise AssertionError("read again despite the cache")

    monkeypatch.setattr("kdframe_text.reading.split_rows", fail)
    assert columns(load(p, "train", tokenizer, tmp_path / "cache")) == first
    monkeypatch.undo()
    time.sleep(0.01)
    write_csv(train, ROWS[:2])  # the file changes: a new key, read again
    assert len(load(p, "train", tokenizer, tmp_path / "cache")) == 2


def test_fingerprint_follows_content_not_place(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", ROWS)
    b = write_csv(tmp_path / "b.csv", ROWS)
    fingerprint = lambda p: text.kdframe_data_fingerprint(data=DataSpec(task="t", source="text", params=p))
    assert fingerprint(params(train_file=str(a), dev_fraction=0.2)) == fingerprint(params(train_file=str(b),
                                                                                         dev_fraction=0.2))
    write_csv(b, ROWS[1:])
    assert fingerprint(params(train_file=str(a), dev_fraction=0.2)) != fingerprint(params(train_file=str(b),
                                                                                         dev_fraction=0.2))
    assert fingerprint(params(dataset="org/name", revision="v1")) == "hub:org/name@v1:"


# -- the task's keys ----------------------------------------------------------------------

@pytest.mark.parametrize(("keys", "needle"), [
    ({}, "train_file: give either train_file"),
    ({"train_file": "t.csv", "dataset": "org/x"}, "train_file: give either train_file"),
    ({"train_file": "t.xlsx", "dev_fraction": 0.1}, "train_file: 't.xlsx' is not a file kdframe reads"),
    ({"train_file": "t.csv"}, "dev_file: give the dev examples' file, or hold out"),
    ({"train_file": "t.csv", "dev_file": "d.csv", "dev_fraction": 0.1}, "dev_fraction: the dev examples are dev_file"),
    ({"dataset": "org/x", "dev_file": "d.csv"}, "dev_file: only with train_file"),
    ({"train_file": "t.csv", "dev_fraction": 0.1, "revision": "v1"}, "revision: only with dataset"),
    ({"dataset": "org/x", "labels": ["a"]}, "labels: list the label set"),
    ({"dataset": "org/x", "labels": ["a", "a"]}, "labels: 'a' listed twice"),
    ({"dataset": "org/x", "label_names": ["x"]}, "label_names: 1 names for 2 labels"),
    ({"dataset": "org/x", "score_range": [5, 0], "labels": []}, "score_range: give [lowest, highest]"),
    ({"dataset": "org/x", "metrics": ["bleu"]}, "metrics: unknown metric 'bleu'"),
    ({"dataset": "org/x", "metrics": ["pearson"]}, "metrics: pearson cannot score a classification task"),
    ({"dataset": "org/x", "labels": ["a", "b", "c"], "metrics": ["f1"]}, "metrics: f1 is the F1 of label 1 of two"),
    ({"dataset": "org/x", "main_metric": "f1"}, "main_metric: 'f1' is not one of metrics (accuracy)"),
    ({"dataset": "org/x", "text_columns": ["a", "b", "c"]}, "text_columns: name one text column, or two"),
    ({"dataset": "org/x", "text_columns": ["sentiment"]}, "label_column: 'sentiment' is also a text column"),
    ({"dataset": "org/x", "where": {"origin": []}}, "where.origin: an empty list keeps no row"),
])
def test_task_key_problems(keys: dict, needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        task_info("t", params(**keys))
    assert any(problem.startswith(needle) for problem in info.value.problems), info.value.problems


def text_recipe(tmp_path: Path, **data) -> dict:
    raw = smoke_raw()
    raw["name"] = "text_smoke"
    raw["data"] = {"source": "text", "task": "reviews", "text_columns": ["text"], "label_column": "sentiment",
                   "labels": ["neg", "pos"], "max_length": 48, **data}
    return raw


def test_recipe_problems_name_their_keys(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ROWS)
    raw = text_recipe(tmp_path, train_file=str(train), metrics=["accuracy", "bleu"], glue_dir="x")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "data: unknown key 'glue_dir'", "main_metric")
    raw["data"].pop("glue_dir")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "data.dev_file: give the dev examples' file",
                     "data.metrics: unknown metric 'bleu'")
    raw["data"].update(task="mrpc", dev_fraction=0.2, metrics=["accuracy"])
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)),
                     "data.task: 'mrpc' is a task of data source 'glue'; name your own task")
    raw["data"].update(task="my task")
    assert_bad_input(kd("validate", write_recipe(tmp_path, raw)), "data.task: must be a plain name")


# -- bad data: exit 2, one message naming file, column and row, nothing written -------------------

def bad_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(("make", "data", "needles"), [
    (lambda d: write_csv(d / "t.csv", ROWS, header=("body", "sentiment", "origin")), {},
     ["t.csv: no column 'text'; it has body, sentiment, origin"]),
    (lambda d: write_csv(d / "t.csv", [*ROWS, ("x", "meh", "x")]), {},
     ["t.csv: row 6: label 'meh' is not in data.labels (neg, pos)"]),
    (lambda d: bad_file(d, "t.csv", "text,sentiment,origin\n"), {}, ["t.csv: the split is empty"]),
    (lambda d: write_csv(d / "t.csv", [(1, "pos", "x"), (2, "neg", "x")]), {},
     ["t.csv: column 'text' holds int64, not text"]),
    (lambda d: write_csv(d / "t.csv", [("a", "pos", "x"), ("", "neg", "x")]), {},
     ["t.csv: row 2: column 'text' is empty"]),
    (lambda d: bad_file(d, "t.jsonl", '{"text": "a", "sentiment": "pos"}\n{"text": \n'), {},
     ["t.jsonl: does not parse as JSONL"]),
    (lambda d: bad_file(d, "t.parquet", b"PAR1 this is not parquet"), {}, ["t.parquet: does not parse as PARQUET"]),
    (lambda d: write_csv(d / "t.csv", [("a", 7.5, "x")], header=("text", "score", "origin")),
     {"label_column": "score", "labels": [], "score_range": [0, 5], "metrics": ["pearson"]},
     ["t.csv: row 1: score 7.5 is outside data.score_range [0.0, 5.0]"]),
    (lambda d: d / "missing.csv", {}, ["missing.csv: file not found"]),
], ids=["column", "label", "empty", "not-text", "null-text", "jsonl", "parquet", "score", "missing"])
def test_bad_data_exits_2_naming_file_and_row(make, data: dict, needles: list[str], tmp_path: Path) -> None:
    train = make(tmp_path)
    raw = text_recipe(tmp_path, train_file=str(train), dev_file=str(train), **data)
    out = tmp_path / "run"
    result = kd("run", write_recipe(tmp_path, raw), "--out", str(out))
    assert_bad_input(result, *needles, out=out)
    assert not out.exists()
    assert len(result.err.strip().splitlines()) == 1  # one message


def test_hub_dataset_offline_fails_in_seconds(tmp_path: Path) -> None:
    raw = text_recipe(tmp_path, dataset="someone/reviews", revision="v1")
    started = time.monotonic()
    result = kd("run", write_recipe(tmp_path, raw), "--out", str(tmp_path / "run"),
                env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert time.monotonic() - started < 60  # models load first; the data fails without retries
    assert_bad_input(result, "cannot load someone/reviews (train): the Hugging Face hub cannot be reached"
                             " (HF_HUB_OFFLINE is set)", "save_to_disk", out=tmp_path / "run")


def test_a_text_recipe_runs_end_to_end(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "all.csv", [(f"{w} film {i}", "pos" if w in "good great" else "neg", "x")
                                             for i, w in enumerate(["good", "bad", "great", "awful"] * 10)])
    raw = text_recipe(tmp_path, train_file=str(train), dev_fraction=0.25, metrics=["macro_f1", "accuracy"])
    raw["teacher"]["train"]["epochs"] = 1
    raw["stages"][0]["epochs"] = 1
    out = tmp_path / "run"
    result = kd("run", write_recipe(tmp_path, raw), "--out", str(out), "--progress", "off")
    assert result.rc == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["main_metric"] == "macro_f1" and set(summary["student"]["best"]) == {"macro_f1", "accuracy"}


# -- metrics --------------------------------------------------------------------------------

def metrics(names: tuple[str, ...], predictions, labels, num_labels: int = 2) -> dict[str, float]:
    info = TaskInfo("t", num_labels, names, names[0])
    return text.kdframe_compute_metrics(task=info, predictions=predictions, labels=labels)


def test_metric_names_are_the_computed_ones() -> None:
    assert set(METRIC_NAMES) == set(METRICS)


def test_accuracy_and_f1() -> None:
    # tp=2, fp=1, fn=1, tn=1: F1 = 2*2 / (2*2 + 1 + 1)
    result = metrics(("f1", "accuracy"), [1, 1, 0, 0, 1], [1, 1, 1, 0, 0])
    assert result == {"f1": pytest.approx(4 / 6), "accuracy": pytest.approx(3 / 5)}
    assert metrics(("f1", "accuracy"), [0, 0], [0, 0]) == {"f1": 0.0, "accuracy": 1.0}
    assert metrics(("accuracy",), np.array([0, 1, 1]), np.array([0, 1, 0])) == {"accuracy": pytest.approx(2 / 3)}


def test_macro_f1_by_hand() -> None:
    pred, gold = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 2]
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 2 -> 2/5
    assert metrics(("macro_f1",), pred, gold, 3) == {"macro_f1": pytest.approx((2 / 3 + 1 / 2 + 2 / 5) / 3)}
    assert metrics(("macro_f1",), [1, 1], [1, 1]) == {"macro_f1": 1.0}


def test_matthews() -> None:
    # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2)
    assert metrics(("matthews",), [1, 1, 0, 0, 1], [1, 1, 1, 0, 0]) == {"matthews": pytest.approx(1 / 6)}
    assert metrics(("matthews",), [0, 1, 0, 1], [0, 1, 0, 1]) == {"matthews": pytest.approx(1.0)}
    assert metrics(("matthews",), [1, 0], [0, 1]) == {"matthews": pytest.approx(-1.0)}
    assert metrics(("matthews",), [1, 1, 1], [0, 1, 0]) == {"matthews": 0.0}  # zero denominator


def test_correlations() -> None:
    gold = [0.0, 1.5, 2.0, 4.0, 5.0]
    pred = np.array([[0.3], [1.0], [2.5], [3.0], [5.5]])  # a regression head's (N, 1) output
    result = metrics(("pearson", "spearman"), pred, gold, 1)
    x, y = pred.ravel() - pred.mean(), np.array(gold) - np.mean(gold)
    assert result["pearson"] == pytest.approx(float(x @ y / math.sqrt((x @ x) * (y @ y))))
    assert result["pearson"] == pytest.approx(stats.pearsonr(pred.ravel(), gold).statistic)
    assert result["spearman"] == pytest.approx(1.0)  # same ranks
    ranked = metrics(("spearman",), [3.0, 1.0, 2.0], [1.0, 2.0, 3.0], 1)["spearman"]
    assert ranked == pytest.approx(stats.spearmanr([3, 1, 2], [1, 2, 3]).statistic) == pytest.approx(-0.5)
    assert metrics(("pearson", "spearman"), [2.0, 2.0, 2.0], gold[:3], 1) == {"pearson": 0.0, "spearman": 0.0}


def test_metrics_for_other_tasks() -> None:
    assert text.kdframe_compute_metrics(task=TaskInfo("x", 2, ("bleu",), "bleu"), predictions=[1], labels=[1]) is None
    with pytest.raises(ValueError, match="as many predictions as labels"):
        metrics(("accuracy",), [1, 0], [1])


def test_the_guides_own_data_recipe_validates(tmp_path: Path) -> None:
    """docs/guide.md's "Distil on your own data" recipe, as printed, on data shaped like its sample."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    section = guide[guide.index("## Distil on your own data"):]
    recipe = section[section.index("```toml\n") + len("```toml\n"):section.index("```\n\n**3.")]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "minilm_base.toml").write_text(
        (Path(__file__).resolve().parents[1] / "recipes" / "minilm_base.toml").read_text())
    (tmp_path / "reviews").mkdir()
    for name, count in (("train.csv", 20), ("dev.csv", 5)):
        write_csv(tmp_path / "reviews" / name, [(f"review {i}", str(i % 5 + 1)) for i in range(count)],
                  header=("review", "stars"))
    (tmp_path / "my_reviews.toml").write_text(recipe)
    result = kd("validate", tmp_path / "my_reviews.toml")
    assert result.rc == 0, result.err
    assert "task reviews: 20 train / 5 dev examples, metric accuracy" in " ".join(result.out.split())


def test_batches_from_a_table_of_many_chunks_hold_exactly_their_rows() -> None:
    """A memory-mapped token cache holds one chunk per 1,000 rows: collate reads the batch's rows
    by slices (Table.take would concatenate every chunk first); the batch equals a by-hand one."""
    import numpy as np
    import pyarrow as pa
    import torch

    from kdframe.batches import collate
    from kdframe.types import TaskInfo, TokenizedSplit

    task = TaskInfo("pairs", 2, ("accuracy",), "accuracy")
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(5, 100, rng.integers(1, 9))) for _ in range(60)]
    labels = [int(x) for x in rng.integers(0, 2, 60)]
    whole = TokenizedSplit.from_lists(task, "train", ids, labels)
    chunked = pa.Table.from_batches([b for start in range(0, 60, 7) for b in whole.table.slice(start, 7).to_batches()])
    split = TokenizedSplit(task, "train", chunked)
    assert split.table.column("input_ids").num_chunks == 9
    indices = [59, 0, 13, 14, 7, 42]
    batch = collate(split, indices, torch.device("cpu"))
    longest = max(len(ids[i]) for i in indices)
    expected = torch.tensor([ids[i] + [0] * (longest - len(ids[i])) for i in indices])
    assert torch.equal(batch["input_ids"], expected)
    assert torch.equal(batch["attention_mask"], (expected != 0).long())
    assert batch["labels"].tolist() == [labels[i] for i in indices]
