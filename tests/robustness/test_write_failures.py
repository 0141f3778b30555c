"""Files that cannot be written, and files that are written wrong: one line naming the path and
the cause (exit 1, or 2 before anything ran), the previous checkpoint intact and a resume that
works; a corrupt latest checkpoint falls back to the previous generation; caches are checked
before the run directory exists, and a corrupt one is rebuilt."""

import os
import resource
import signal
import subprocess
import sys

import torch
from robust_helpers import SMOKE, assert_bad_input, kd

from conftest import FIXTURES, ROOT, run_cli


def limited(limit_bytes):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return set_limit


def test_a_checkpoint_that_does_not_fit_stops_the_run_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(FIXTURES), "KDFRAME_TEST_BLOAT_AT": "4", "KDFRAME_CACHE": str(tmp_path / "c")}
    full = subprocess.run([sys.executable, "-m", "kdframe.cli", "run", str(SMOKE), "--out", str(out), "--progress", "off",
                           "-p", "kdframe_test_bloat"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limited(1_000_000))
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    [line] = [l for l in full.stderr.splitlines() if l.startswith("kdframe:")]
    assert line.startswith(f"kdframe: run failed: cannot write {out / 'checkpoint.pt'}: File too large; the last"
                           f" checkpoint ({out / 'checkpoint.pt'}) is intact: once there is room, resume with ")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["stage"] == "distil" and state["position"]["step"] == 2  # the one before, untouched
    assert not list(out.glob(".checkpoint.pt.*"))  # no half-written file left beside it
    resumed = run_cli("run", str(SMOKE), "--resume", str(out), "--progress", "off", env={"KDFRAME_CACHE": str(tmp_path / "c")})
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.json").exists()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    killed = run_cli("run", str(SMOKE), "--out", str(out), "--progress", "off", "-p", "kdframe_test_killer",
                     env={"KDFRAME_TEST_KILL": "step:5"})
    assert killed.returncode == -9
    latest = torch.load(out / "checkpoint.pt", weights_only=True)["position"]["step"]
    previous = torch.load(out / "checkpoint.prev.pt", weights_only=True)["position"]["step"]
    assert (latest, previous) == (4, 2)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # torn after it was written
    resumed = run_cli("run", str(SMOKE), "--resume", str(out), "--progress", "plain")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {out / 'checkpoint.pt'} cannot be loaded" in resumed.stderr
    assert f"resuming from the previous checkpoint {out / 'checkpoint.prev.pt'} instead" in resumed.stderr
    assert "[distil] resuming at step 2/8" in resumed.stderr


def test_an_unwritable_cache_fails_before_the_run_directory(tmp_path):
    """The cache directory is a file here (as root, permissions would not stop a write): the run
    would fine-tune its teacher and then fail to cache it; it is refused before the run starts."""
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    out = tmp_path / "run"
    result = kd("run", SMOKE, "--out", out, "--progress", "off", env={"KDFRAME_CACHE": str(cache)})
    assert_bad_input(result, f"the cache directory {cache} is not writable", "set data.cache_dir or KDFRAME_CACHE")
    assert not out.exists()


def test_a_corrupt_cached_teacher_is_fine_tuned_again(tmp_path):
    cache = tmp_path / "cache"
    first = run_cli("run", str(SMOKE), "--out", str(tmp_path / "a"), "--progress", "off", env={"KDFRAME_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    [cached] = (cache / "teachers").glob("*.pt")
    cached.chmod(0o600)  # kdframe leaves it read-only (run directories link to it)
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    again = run_cli("run", str(SMOKE), "--out", str(tmp_path / "b"), "--progress", "plain", env={"KDFRAME_CACHE": str(cache)})
    assert again.returncode == 0, again.stderr
    assert f"checkpoint {cached} cannot be loaded" in again.stderr and "removed it: the teacher is fine-tuned again" in again.stderr
    assert "teacher (fine-tuned in this run)" in again.stderr
    torch.load(cached, weights_only=True)  # rebuilt


def test_a_tokenisation_cache_with_labels_outside_the_label_set_is_rebuilt(tmp_path):
    import datasets

    cache = tmp_path / "cache"
    assert kd("validate", SMOKE, env={"KDFRAME_CACHE": str(cache)}).rc == 0
    [file] = sorted((cache / "tokens").glob("mrpc-dev-*.arrow"))
    table = datasets.Dataset.from_file(str(file)).data.table
    columns = table.to_pydict()
    columns["labels"][0] = 7  # well-formed, but MRPC has labels 0 and 1
    # Written under another name and moved into place, as datasets writes it (a file rewritten in
    # place would change under the mapping above).
    datasets.Dataset.from_dict(columns, features=datasets.Dataset.from_file(str(file)).features).map(
        lambda batch: batch, batched=True, cache_file_name=str(tmp_path / "bad.arrow"))
    (tmp_path / "bad.arrow").replace(file)
    out = tmp_path / "run"
    result = kd("run", SMOKE, "--out", out, "--progress", "off", "--set", "stages[0].max_steps=2",
                env={"KDFRAME_CACHE": str(cache)})
    assert result.rc == 0, result.err
    assert datasets.Dataset.from_file(str(file))["labels"][0] in (0, 1)  # rebuilt from the TSV