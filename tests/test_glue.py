"""kdframe_glue: the task table, TSV and hub loading, the tokenisation cache and the metrics."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import datasets
import numpy as np
import pluggy
import pytest
from scipy import stats
from transformers import BertTokenizerFast

import kdframe_glue as glue
from kdframe import hookspecs
from kdframe.api import DataError, Registry, TaskInfo
from kdframe.caches import cache_root
from kdframe.recipe import DataSpec
from kdframe_glue.reading import tsv_rows
from kdframe_glue.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"
needs_shared = pytest.mark.skipif(
    not SHARED_GLUE.is_dir(), reason=f"the shared GLUE snapshot is not at {SHARED_GLUE} (../shared/data/glue)"
)

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def load(task: str, split: str, tokenizer, cache: Path, glue_dir: Path | str = SHARED_GLUE, **data):
    spec = DataSpec(task=task, source="glue", params=glue.GlueParams(glue_dir=str(glue_dir)), **data)
    return glue.kdframe_load_data(data=spec, task=TASKS[task].info, split=split, tokenizer=tokenizer,
                                  cache_dir=str(cache))


def ids(split, column: str = "input_ids") -> list[list[int]]:
    return split.table.column(column).to_pylist()


def labels(split) -> list:
    return split.table.column("labels").to_pylist()


def registered() -> Registry:
    registry = Registry()
    glue.kdframe_register(registry=registry)
    return registry


def write(root: Path, relative: str, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (text.replace("\n", "\r\n") if crlf else text).encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def data_error(task: str, split: str, tokenizer, tmp_path: Path, **data) -> str:
    with pytest.raises(DataError) as info:
        load(task, split, tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue", **data)
    return str(info.value)


# -- tasks --------------------------------------------------------------------------------

def info_of(name: str) -> TaskInfo:
    return registered().task(name).info


def test_task_table_follows_glue() -> None:
    registry = registered()
    assert [task.name for task in registry.tasks()] == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli-mm",
                                                        "qnli", "rte", "wnli"]
    assert {task.source for task in registry.tasks()} == {"glue"}
    assert [source.name for source in registry.data_sources()] == ["glue"]
    main = {task.name: task.info.main_metric for task in registry.tasks()}
    assert main == {"cola": "matthews", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "spearman",
                    "mnli": "accuracy", "mnli-mm": "accuracy", "qnli": "accuracy", "rte": "accuracy",
                    "wnli": "accuracy"}
    for name in main:
        info = info_of(name)
        assert info.main_metric in info.metrics and info.num_labels == (len(info.labels) or 1)
    assert info_of("mrpc").metrics == ("f1", "accuracy")
    stsb = info_of("stsb")
    assert stsb.is_regression and stsb.metrics == ("pearson", "spearman")
    # TSV label values in nyu-mll/glue ClassLabel id order.
    assert info_of("rte").labels == ("entailment", "not_entailment")
    assert info_of("mnli").labels == ("entailment", "neutral", "contradiction")
    assert info_of("cola").labels == ("0", "1")
    assert info_of("mnli").text_columns == ("premise", "hypothesis")


def test_other_sources_are_left_to_other_plugins(tokenizer, tmp_path: Path) -> None:
    assert registered().task("squad") is None
    other = TaskInfo("squad", 2, ("accuracy",), "accuracy")
    assert glue.kdframe_load_data(data=DataSpec(task="squad", source="squad"), task=other, split="train",
                                  tokenizer=tokenizer, cache_dir=str(tmp_path)) is None
    assert glue.kdframe_data_fingerprint(data=DataSpec(task="squad", source="squad")) is None


def test_hooks_match_the_hookspecs() -> None:
    pm = pluggy.PluginManager("kdframe")
    pm.add_hookspecs(hookspecs)
    pm.register(glue)  # raises on a misspelt hook or argument
    registry = Registry()
    pm.hook.kdframe_register(registry=registry)
    assert registry.task("rte").source == "glue"


# -- the real GLUE files ------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize(("task", "split", "rows"), [
    ("rte", "train", 2490), ("mrpc", "dev", 408), ("cola", "dev", 1043), ("stsb", "dev", 1500),
    ("sst2", "dev", 872),
])
def test_real_split_sizes(task: str, split: str, rows: int, tokenizer, tmp_path: Path) -> None:
    # A long max_length keeps this fast: the letter-level vocabulary makes RTE pairs very long, and
    # longest_first truncation of a pair grows with how much it must cut.
    loaded = load(task, split, tokenizer, tmp_path, max_length=512)
    assert len(loaded) == len(ids(loaded, "token_type_ids")) == len(labels(loaded)) == rows
    assert loaded.split == split and loaded.task.name == task
    assert loaded.source == str(SHARED_GLUE / TASKS[task].folder / f"{split}.tsv")
    assert all(row[0] == tokenizer.cls_token_id and len(row) <= 512 for row in ids(loaded))
    assert [len(t) for t in ids(loaded, "token_type_ids")] == [len(row) for row in ids(loaded)]
    kinds = {type(y) for y in labels(loaded)}
    assert kinds == ({float} if task == "stsb" else {int})


@needs_shared
@pytest.mark.parametrize(("task", "split"), [("rte", "dev"), ("stsb", "dev"), ("cola", "dev")])
def test_tokens_match_a_plain_reading(task: str, split: str, tokenizer, tmp_path: Path) -> None:
    """Against an independent reading: csv with QUOTE_NONE, the tokenizer called on the lists."""
    glue_task = TASKS[task]
    with (SHARED_GLUE / glue_task.folder / f"{split}.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows if glue_task.headerless_columns else rows[1:]
    texts = [[row[at] for row in rows] for at in glue_task.text_at]
    expected = tokenizer(*texts, truncation=True, max_length=64)
    gold = [row[glue_task.label_at] for row in rows]
    loaded = load(task, split, tokenizer, tmp_path, max_length=64)
    assert ids(loaded) == expected["input_ids"]
    assert ids(loaded, "token_type_ids") == expected["token_type_ids"]
    if task == "stsb":
        assert labels(loaded) == [float(y) for y in gold]
    else:
        assert labels(loaded) == [glue_task.info.labels.index(y) for y in gold]


@needs_shared
def test_mrpc_dev_labels_and_pairs(tokenizer, tmp_path: Path) -> None:
    loaded = load("mrpc", "dev", tokenizer, tmp_path)
    assert sum(labels(loaded)) == 279
    assert all(1 in types for types in ids(loaded, "token_type_ids"))  # sentence pairs: segment 1 exists


@needs_shared
def test_stsb_scores_are_floats(tokenizer, tmp_path: Path) -> None:
    scores = labels(load("stsb", "dev", tokenizer, tmp_path))
    assert scores[:2] == [5.0, 4.75] and min(scores) == 0.0 and max(scores) == 5.0


@needs_shared
def test_rte_keeps_leading_quotes() -> None:
    examples = list(tsv_rows(str(SHARED_GLUE / "RTE/train.tsv"), "rte"))
    assert len(examples) == 2490
    # Default CSV quoting would merge this row's fields; QUOTE_NONE keeps it verbatim.
    assert examples[2164]["sentence1"].startswith("\"That film wasn't too successful, but then 'WarGames,'")
    assert examples[2164]["sentence2"] == 'The film "WarGames" was shot in 1983.'
    assert examples[2164]["label"] == 1  # not_entailment


def test_bundled_mrpc_is_the_documented_copy() -> None:
    expected = {"train.tsv": "69abcedee3cf738c6ce58d772e43e1b7cdf5b4edee4aceda459c0d9f4e5599f3",
                "dev.tsv": "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17"}
    sources = (REPO / "data/glue/SOURCES.md").read_text(encoding="utf-8")
    for name, sha in expected.items():
        assert hashlib.sha256((REPO / "data/glue/MRPC" / name).read_bytes()).hexdigest() == sha
        assert sha in sources


def test_bundled_mrpc_loads(tokenizer, tmp_path: Path) -> None:
    loaded = load("mrpc", "train", tokenizer, tmp_path, glue_dir=REPO / "data/glue", train_limit=10)
    assert len(loaded) == 10


# -- malformed data -----------------------------------------------------------------------

def test_missing_file_names_layout_and_contents(tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    write(tmp_path, "glue/RTE/notes.txt", "")
    message = data_error("rte", "train", tokenizer, tmp_path)
    assert str(tmp_path / "glue/RTE/train.tsv") in message and "file not found" in message
    assert "<glue_dir>/RTE/{train,dev}.tsv" in message and "holds: dev.tsv, notes.txt" in message


def test_missing_task_folder_lists_glue_dir(tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/MRPC/dev.tsv", "")
    message = data_error("mnli-mm", "dev", tokenizer, tmp_path)
    assert "MNLI/dev_mismatched.tsv: file not found" in message
    assert f"{tmp_path / 'glue'} holds: MRPC/" in message


def test_wrong_column_count_names_line(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "glue/RTE/train.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\ta b\tentailment\n")
    message = data_error("rte", "train", tokenizer, tmp_path)
    assert message == f"{path}:3: expected 4 tab-separated columns (as in the header), found 3"


def test_cola_has_no_header(tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/CoLA/dev.tsv", "gj04\t1\t\tthe cat sat .\ngj04\t0\t*\tcat the sat .\n")
    assert labels(load("cola", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue")) == [1, 0]
    path = write(tmp_path, "glue/CoLA/train.tsv", "gj04\t1\tthe cat sat .\n")
    message = data_error("cola", "train", tokenizer, tmp_path)
    assert message.startswith(f"{path}:1: expected 4 tab-separated columns (CoLA files have no header)")


def test_unknown_label_lists_allowed(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    message = data_error("rte", "dev", tokenizer, tmp_path)
    assert message == f"{path}:3: column 4: unknown label 'maybe'; allowed: entailment, not_entailment"


def test_unparsable_stsb_score(tokenizer, tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = write(tmp_path, "glue/STS-B/dev.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    message = data_error("stsb", "dev", tokenizer, tmp_path)
    assert message == f"{path}:2: column 10: score 'five' is not a number"


@pytest.mark.parametrize("text", ["", RTE_HEADER, RTE_HEADER + "\n"])
def test_empty_split(text: str, tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path, "glue/RTE/train.tsv", text)
    assert data_error("rte", "train", tokenizer, tmp_path).startswith(f"{path}: the split is empty")


def test_not_utf8(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "glue/RTE/dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes(RTE_HEADER.encode() + b"0\tcaf\xe9\tb\tentailment\n")
    assert data_error("rte", "dev", tokenizer, tmp_path).startswith(f"{path}: not UTF-8 text")


def test_unknown_split(tokenizer, tmp_path: Path) -> None:
    assert "unknown split 'test'" in data_error("rte", "test", tokenizer, tmp_path)


def test_bom_and_crlf_are_tolerated(tokenizer, tmp_path: Path) -> None:
    text = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t\" quoted\tb\n0\t3\t4\tc\td\n"
    write(tmp_path, "glue/MRPC/dev.tsv", text, bom=True, crlf=True)
    loaded = load("mrpc", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue")
    assert labels(loaded) == [1, 0]
    examples = list(tsv_rows(str(tmp_path / "glue/MRPC/dev.tsv"), "mrpc"))
    assert [(e["sentence1"], e["sentence2"]) for e in examples] == [('" quoted', "b"), ("c", "d")]  # no \r, quote kept


def test_mnli_files_and_label_column(tokenizer, tmp_path: Path) -> None:
    # Train rows end in gold_label after one annotator label; dev rows carry five, so columns differ.
    head = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2"
    train_row = "0\t1\t2\tg\t.\t.\t.\t.\ta\tb\tneutral\tneutral\n"
    write(tmp_path, "glue/MNLI/train.tsv", head + "\tlabel1\tgold_label\n" + train_row)
    annotators = "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    row = "0\t1\t2\tg\t.\t.\t.\t.\ta\tb\tneutral\tneutral\tneutral\tneutral\tneutral\tcontradiction\n"
    write(tmp_path, "glue/MNLI/dev_mismatched.tsv", head + annotators + row)
    assert labels(load("mnli-mm", "train", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue")) == [1]
    dev = load("mnli-mm", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue")
    assert labels(dev) == [2] and dev.source.endswith("MNLI/dev_mismatched.tsv")


def test_limits_keep_the_first_examples(tokenizer, tmp_path: Path) -> None:
    rows = "".join(f"{i}\tw{i}\tx\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(10))
    write(tmp_path, "glue/RTE/train.tsv", RTE_HEADER + rows)
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + rows)
    train = load("rte", "train", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue", train_limit=3)
    dev = load("rte", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue", train_limit=3)
    assert labels(train) == [1, 0, 1] and len(dev) == 10
    assert tokenizer.convert_ids_to_tokens(ids(train)[2])[:4] == ["[CLS]", "w", "##2", "[SEP]"]


def test_truncation_without_padding(tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\tabcdefghij\tabc\tentailment\n1\ta\tb\tentailment\n")
    loaded = load("rte", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue", max_length=8)
    assert [len(row) for row in ids(loaded)] == [8, 5]
    assert ids(loaded, "token_type_ids")[1] == [0, 0, 0, 1, 1]


# -- the cache ----------------------------------------------------------------------------

def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "tokens").iterdir())


def test_cache_is_reused_and_keyed(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    cache = tmp_path / "cache"
    first = load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue")
    assert [p.suffix for p in cache_files(cache)] == [".arrow"]  # no temp file left behind

    def fail(*args):
        raise AssertionError("parsed again despite the cache")

    monkeypatch.setattr("kdframe_glue.loading.read_tsv", fail)
    again = load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue")
    assert again.table.equals(first.table)
    monkeypatch.undo()

    load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue", max_length=4)
    load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue", dev_limit=1)
    path.write_text(RTE_HEADER + "0\ta\tb\tnot_entailment\n")  # the file changes: size/mtime key
    assert labels(load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue")) == [1]
    assert len(cache_files(cache)) == 4


def test_cache_depends_on_the_vocabulary(tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\tab\tb\tentailment\n")
    other = tmp_path / "other"
    other.mkdir()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["ab"]
    (other / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    bigger = BertTokenizerFast.from_pretrained(str(other))
    plain = load("rte", "dev", tokenizer, tmp_path / "cache", glue_dir=tmp_path / "glue")
    merged = load("rte", "dev", bigger, tmp_path / "cache", glue_dir=tmp_path / "glue")
    assert len(ids(merged)[0]) == len(ids(plain)[0]) - 1


def arrow_file(tmp_path: Path, columns: dict) -> bytes:
    """The bytes of an Arrow file holding ``columns`` (as datasets writes its cache files)."""
    path = tmp_path / "made.arrow"
    datasets.Dataset.from_dict(columns).map(lambda b: b, batched=True, cache_file_name=str(path))
    return path.read_bytes()


@pytest.mark.parametrize("garbage", [
    lambda tmp: b"not arrow at all",
    lambda tmp: b"",
    lambda tmp: arrow_file(tmp, {"input_ids": [[1]], "labels": [0]}),  # a column short
    lambda tmp: arrow_file(tmp, {"input_ids": [[2, 5]], "token_type_ids": [[0, 0]], "labels": [7]}),  # no such label
    lambda tmp: arrow_file(tmp, {"input_ids": [[2, 500]], "token_type_ids": [[0, 0]], "labels": [0]}),  # id > vocab
], ids=["bytes", "empty", "columns", "label", "token"])
def test_corrupt_cache_is_rebuilt(garbage, tokenizer, tmp_path: Path) -> None:
    write(tmp_path, "glue/RTE/dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    cache = tmp_path / "cache"
    expected = load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue").table.to_pydict()
    [file] = cache_files(cache)
    written = garbage(tmp_path)
    # A new file in its place: rewriting a file in place would pull it from under the mapping above.
    (tmp_path / "corrupt").write_bytes(written)
    (tmp_path / "corrupt").replace(file)
    again = load("rte", "dev", tokenizer, cache, glue_dir=tmp_path / "glue")
    assert again.table.to_pydict() == expected and labels(again) == [0]
    assert file.read_bytes() != written


def test_cache_root_from_recipe_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache directory the engine hands to kdframe_load_data: data.cache_dir, else $KDFRAME_CACHE."""
    monkeypatch.setenv("KDFRAME_CACHE", str(tmp_path / "env-cache"))
    assert cache_root(DataSpec(task="rte")) == tmp_path / "env-cache"
    assert cache_root(DataSpec(task="rte", cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"
    monkeypatch.delenv("KDFRAME_CACHE")
    assert cache_root(DataSpec(task="rte")) == Path.home() / ".cache" / "kdframe"


# -- the hub (offline: datasets.load_dataset is replaced by in-memory datasets) -------------

def fake_hub(monkeypatch: pytest.MonkeyPatch, columns: dict,
             label: datasets.Value | datasets.ClassLabel) -> list:
    calls: list = []
    features = datasets.Features({**{name: datasets.Value("string") for name in columns if name != "label"},
                                  "label": label})

    def load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(columns, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_rte(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    columns = {"sentence1": ["a b", "c"], "sentence2": ["d", "e"], "idx": ["0", "1"], "label": [1, 0]}
    calls = fake_hub(monkeypatch, columns, datasets.ClassLabel(names=["entailment", "not_entailment"]))
    loaded = load("rte", "dev", tokenizer, tmp_path, glue_dir="")
    assert calls == [("nyu-mll/glue", "rte", "validation")]
    assert labels(loaded) == [1, 0] and loaded.source == "nyu-mll/glue (rte, validation)"
    assert tokenizer.convert_ids_to_tokens(ids(loaded)[0]) == ["[CLS]", "a", "b", "[SEP]", "d", "[SEP]"]
    assert labels(load("rte", "dev", tokenizer, tmp_path, glue_dir="")) == [1, 0]
    assert len(calls) == 1  # served from the cache


def test_hub_mnli_mismatched_and_stsb(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_hub(monkeypatch, {"premise": ["a"], "hypothesis": ["b"], "label": [2]},
                     datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]))
    assert labels(load("mnli-mm", "dev", tokenizer, tmp_path, glue_dir="")) == [2]
    assert labels(load("mnli-mm", "train", tokenizer, tmp_path, glue_dir="", train_limit=1)) == [2]
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched"), ("nyu-mll/glue", "mnli", "train")]
    fake_hub(monkeypatch, {"sentence1": ["a"], "sentence2": ["b"], "label": [3.25]},
             datasets.Value("float32"))
    assert labels(load("stsb", "train", tokenizer, tmp_path, glue_dir="")) == [3.25]


def test_hub_unlabelled_rows_are_rejected(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, {"sentence": ["a", "b"], "label": [0, -1]},
             datasets.ClassLabel(names=["unacceptable", "acceptable"]))
    expected = r"nyu-mll/glue \(cola, validation\): row 2 has label -1; expected 0\.\.1"
    with pytest.raises(DataError, match=expected):
        load("cola", "dev", tokenizer, tmp_path, glue_dir="")


def test_hub_errors_suggest_glue_dir(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that answers with an error: its message, and the way around the hub."""
    def failing(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    monkeypatch.setattr("kdframe.network.unreachable", lambda *args: None)  # the network is up
    with pytest.raises(DataError) as info:
        load("sst2", "train", tokenizer, tmp_path, glue_dir="")
    message = str(info.value)
    assert message.startswith("cannot load nyu-mll/glue (sst2, train): ConnectionError: Couldn't reach")
    assert "set data.glue_dir" in message and "<glue_dir>/SST-2/train.tsv" in message


def test_offline_hub_fails_in_one_line_from_the_local_cache(tokenizer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (HF_HUB_OFFLINE, or no network): datasets is asked in offline mode, so it answers
    from its cache at once or fails, and the message says why."""
    import huggingface_hub.constants

    seen = []

    def offline_only(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as imported in an online session
    with pytest.raises(DataError) as info:
        load("sst2", "train", tokenizer, tmp_path, glue_dir="")
    assert seen == [(True, True)]
    assert str(info.value).startswith("cannot load nyu-mll/glue (sst2, train): the Hugging Face hub cannot be reached"
                                      " (HF_HUB_OFFLINE is set) and it is not in the local datasets cache.")
    assert datasets.config.HF_HUB_OFFLINE is False  # the switch is set for the call only
