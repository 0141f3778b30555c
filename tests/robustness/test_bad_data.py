"""Bad GLUE data: exit 2 naming the file (and line); CRLF line ends and a BOM load as usual.

Each case writes a small MRPC copy (40 train / 20 dev rows) under tmp_path and points
data.glue_dir at it.
"""

from pathlib import Path

import pytest
from robust_helpers import GLUE, assert_bad_input, kd, smoke_raw, write_recipe

TRAIN = (GLUE / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[:41]  # header + 40
DEV = (GLUE / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[:21]


def lf(lines):
    return "\n".join(lines) + "\n"


def glue_dir(root: Path, train: bytes | str | None, dev: bytes | str | None) -> Path:
    folder = root / "glue" / "MRPC"
    folder.mkdir(parents=True)
    for name, content in (("train.tsv", train), ("dev.tsv", dev)):
        if content is not None:
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return root / "glue"


def recipe(tmp_path, glue: Path) -> Path:
    raw = smoke_raw()
    raw["data"]["glue_dir"] = str(glue)
    raw["data"]["train_limit"] = raw["data"]["dev_limit"] = 0
    return write_recipe(tmp_path, raw)


def test_glue_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    assert_bad_input(kd("validate", recipe(tmp_path, missing)),
                     f"{missing}/MRPC/train.tsv: file not found", "<glue_dir>/MRPC/{train,dev}.tsv",
                     f"{missing} does not exist")


def test_missing_dev_file(tmp_path):
    glue = glue_dir(tmp_path, lf(TRAIN), None)
    assert_bad_input(kd("validate", recipe(tmp_path, glue)),
                     f"{glue}/MRPC/dev.tsv: file not found", "holds: train.tsv")


def test_wrong_column_count(tmp_path):
    rows = list(TRAIN)
    rows[5] = "\t".join(rows[5].split("\t")[:4])  # line 6 loses its second sentence
    glue = glue_dir(tmp_path, lf(rows), lf(DEV))
    assert_bad_input(kd("validate", recipe(tmp_path, glue)),
                     f"{glue}/MRPC/train.tsv:6: expected 5 tab-separated columns (as in the header), found 4")


def test_label_outside_the_label_set(tmp_path):
    rows = list(DEV)
    rows[7] = "2" + rows[7][1:]
    glue = glue_dir(tmp_path, lf(TRAIN), lf(rows))
    assert_bad_input(kd("validate", recipe(tmp_path, glue)),
                     f"{glue}/MRPC/dev.tsv:8: column 1: unknown label '2'; allowed: 0, 1")


@pytest.mark.parametrize("content", ["header-only", "zero-bytes"])
def test_empty_split(tmp_path, content):
    glue = glue_dir(tmp_path, lf(TRAIN), lf(DEV[:1]) if content == "header-only" else "")
    assert_bad_input(kd("validate", recipe(tmp_path, glue)), f"{glue}/MRPC/dev.tsv: the split is empty")


def test_data_not_utf8_names_the_line(tmp_path):
    rows = list(DEV)
    rows[12] = rows[12].replace(" ", " caf\xe9 ", 1)
    glue = glue_dir(tmp_path, lf(TRAIN), lf(rows).encode("latin-1", "replace"))
    assert_bad_input(kd("validate", recipe(tmp_path, glue)), f"{glue}/MRPC/dev.tsv: not UTF-8 text at line 13")


def test_unknown_task_name():
    assert_bad_input(kd("validate", str(GLUE.parents[1] / "recipes" / "smoke_tiny.toml"), "--set", 'data.task="sst-2"'),
                     "data.task: unknown task 'sst-2'; known: cola", "sst2")


@pytest.mark.parametrize("variant", ["crlf", "bom", "crlf+bom"])
def test_crlf_and_bom_load_like_plain_files(tmp_path, variant):
    """Windows line ends and a UTF-8 BOM are not errors: exit 0, and the same examples as LF."""
    from kdframe_glue.reading import tsv_rows

    end = "\r\n" if "crlf" in variant else "\n"
    bom = "\ufeff" if "bom" in variant else ""
    glue = glue_dir(tmp_path, bom + end.join(TRAIN) + end, bom + end.join(DEV) + end)
    result = kd("validate", recipe(tmp_path, glue))
    assert result.rc == 0, result.err
    assert "recipe is valid" in result.out
    plain = glue_dir(tmp_path / "plain", lf(TRAIN), lf(DEV))
    for split in ("train", "dev"):
        got = list(tsv_rows(str(glue / "MRPC" / f"{split}.tsv"), "mrpc"))
        want = list(tsv_rows(str(plain / "MRPC" / f"{split}.tsv"), "mrpc"))
        assert got == want
        texts = [row[column] for row in got for column in ("sentence1", "sentence2")]
        assert not any(text.endswith("\r") or text.startswith("\ufeff") for text in texts)


def test_header_and_rows_both_short_of_a_column(tmp_path):
    """MRPC's texts are columns 4 and 5: a file whose header and rows all have 4 columns (so no
    row is shorter than the header) is refused at its header, not with an IndexError."""
    cut = ["\t".join(line.split("\t")[:4]) for line in TRAIN]
    path = tmp_path / "glue" / "MRPC" / "train.tsv"
    result = kd("validate", recipe(tmp_path, glue_dir(tmp_path, lf(cut), lf(DEV))))
    assert_bad_input(result, f"{path}:1: the header has 4 tab-separated columns; MRPC files need at least 5"
                             " (text in column 4, 5, the label in 1)")
