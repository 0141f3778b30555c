"""The teacher feature cache (kdframe.teacher_cache): exactness against a live teacher forward,
the key, the budget, disk reuse across runs, and the engine's use of it end to end."""

from __future__ import annotations

import copy
import errno
import json
import math

import attrs
import pytest
import torch

from conftest import ROOT, read_recipe
from kdframe import teacher_cache
from kdframe.batches import collate
from kdframe.errors import KdframeWarning
from kdframe.fileio import atomic_write
from kdframe.recipe import to_plain
from kdframe.library import run
from kdframe.session import prepare
from kdframe.step import DistillStep, stage_context
from kdframe.teacher_cache import TeacherCache, cache_key, key_parts
from kdframe.trainer import Trainer
from kdframe.types import TokenizedSplit

SMOKE = ROOT / "recipes" / "smoke_tiny.toml"  # EMD: att + hid + emb + pred, teacher 4 layers, student 2
KD = ROOT / "recipes" / "smoke" / "kd.toml"  # logits only
ALL = frozenset({"logits", "hidden", "attn"})


@pytest.fixture(scope="module")
def smoke():
    """The smoke recipe's models (random teacher: exactness needs no fine-tuning) and a stage context."""
    session = prepare(SMOKE, [])
    # The character tokenizer makes every MRPC pair 48 tokens long: cut them to lengths 4..48 so that
    # batches pad differently (what the slicing must get right).
    gen = torch.Generator().manual_seed(0)
    cut = [int(n) for n in torch.randint(4, 49, (len(session.train),), generator=gen)]
    cut[0] = 48
    table = session.train.table
    ids, types = table.column("input_ids").to_pylist(), table.column("token_type_ids").to_pylist()
    session.train = TokenizedSplit.from_lists(session.task, "train", [x[:n] for x, n in zip(ids, cut)],
                                              table.column("labels").to_pylist(),
                                              {"token_type_ids": [t[:n] for t, n in zip(types, cut)]})
    session.teacher.model.eval()
    session.student.model.eval()
    resolved = session.stages[0]
    ctx = stage_context(None, 0, resolved, session.task, session.student, session.teacher, torch.device("cpu"))
    torch.manual_seed(0)
    session.host.extra_parameters(ctx)  # W_h
    session.host.stage_start(ctx)
    return session, ctx


def live(session, batch, needs=ALL):
    with torch.no_grad():
        return session.host.extract_features("teacher", session.teacher, batch, needs)


def new_cache(session, needs=ALL, **kwargs) -> tuple[TeacherCache, list[int]]:
    """A cache and a list that records the size of every teacher forward it makes."""
    forwarded: list[int] = []

    def compute(batch):
        forwarded.append(batch["input_ids"].shape[0])
        return live(session, batch, needs)

    return TeacherCache(compute, session.train, needs, **kwargs), forwarded


def loss_terms(session, ctx, teacher, batch):
    """att, hid, emb and pred through the real plugins' step, on the given teacher features."""
    with torch.no_grad():
        student = session.host.extract_features("student", session.student, batch, ALL)
        out = DistillStep(session.host, ctx).from_features(student, teacher, batch, {})
    return {name: float(value) for name, value in out.terms.items()}


def assert_same_features(got, want, atol=1e-5):
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.logits, want.logits, atol=atol, rtol=1e-5)
    for kind in ("hidden", "attn"):
        a, b = getattr(got, kind), getattr(want, kind)
        assert (a is None) == (b is None)
        if a is not None:
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.shape == y.shape and x.dtype == y.dtype
                torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def batches(session, size, epoch):
    order = torch.randperm(len(session.train), generator=torch.Generator().manual_seed(epoch)).tolist()
    return [order[i:i + size] for i in range(0, len(order), size)]


# -- exactness -----------------------------------------------------------------------------------

def test_assembled_features_and_losses_equal_a_live_forward(smoke):
    """Epoch 1 fills the cache (every example padded to the longest of the split), epoch 2 is
    served from it; every batch's features and loss terms match a live forward on that batch."""
    session, ctx = smoke
    cache, forwarded = new_cache(session)
    lengths = set()
    for epoch in (0, 1):
        for indices in batches(session, 8, epoch):
            batch = collate(session.train, indices, torch.device("cpu"))
            lengths.add(batch["input_ids"].shape[1])
            got, want = cache.features(indices, batch), live(session, batch)
            assert_same_features(got, want)
            terms_got, terms_want = loss_terms(session, ctx, got, batch), loss_terms(session, ctx, want, batch)
            assert set(terms_got) == {"att", "hid", "emb", "pred"}
            for name, value in terms_want.items():
                assert math.isclose(terms_got[name], value, rel_tol=1e-5), (name, terms_got[name], value)
    assert len(lengths) > 3  # batches padded to many lengths, all sliced from the same stored padding
    assert sum(forwarded) == len(session.train)  # each example ran through the teacher once
    assert cache.stats()["hits"] == cache.stats()["misses"] == len(session.train)
    assert cache.length == max(session.train.lengths())


def test_short_and_partly_cached_batches(smoke):
    session, _ = smoke
    cache, forwarded = new_cache(session)
    by_length = sorted(range(len(session.train)), key=lambda i: session.train.lengths()[i])
    short = by_length[:6]
    batch = collate(session.train, short, torch.device("cpu"))
    assert batch["input_ids"].shape[1] < cache.length  # padded less than what is stored
    assert_same_features(cache.features(short, batch), live(session, batch))
    mixed = short[3:] + by_length[-3:]  # three cached, three new (the longest)
    batch = collate(session.train, mixed, torch.device("cpu"))
    assert_same_features(cache.features(mixed, batch), live(session, batch))
    assert forwarded == [6, 3]  # only the missing examples ran
    batch = collate(session.train, short, torch.device("cpu"))
    assert_same_features(cache.features(short, batch), live(session, batch))  # from the cache, now short again
    assert forwarded == [6, 3]
    assert cache.stats()["hits"] == 3 + 6


def test_attention_stored_without_masked_key_columns(smoke):
    session, _ = smoke
    cache, _ = new_cache(session)
    index = min(range(len(session.train)), key=lambda i: session.train.lengths()[i])
    cache.features([index], collate(session.train, [index], torch.device("cpu")))
    entry = cache.memory[index]
    n = session.train.lengths()[index]
    layers, heads = session.teacher.num_layers, session.teacher.num_heads
    assert entry["attn"].shape == (layers, heads, cache.length, n)
    assert entry["hidden"].shape == (layers + 1, cache.length, session.teacher.hidden_size)


def test_cls_only_entries_keep_one_position_and_give_the_live_cls_vectors(smoke):
    """A feature set of [CLS] vectors only (PKD's ``pt``): entries hold the first position of every
    hidden state, unpadded, and every batch of two epochs gets the [CLS] vectors a full live forward
    gives, with the same D^cls."""
    from kdframe_costs.matrices import cls_cost

    session, ctx = smoke
    needs = frozenset({"logits", "cls"})
    cache, forwarded = new_cache(session, needs=needs)
    layers, d = session.teacher.num_layers, session.teacher.hidden_size
    one = collate(session.train, [0], torch.device("cpu"))
    student = session.host.extract_features("student", session.student, one, needs)
    assert [h.shape for h in student.hidden] == [(1, 1, session.student.hidden_size)] * (session.student.num_layers + 1)
    for epoch in (0, 1):
        for indices in batches(session, 8, epoch):
            batch = collate(session.train, indices, torch.device("cpu"))
            got, full = cache.features(indices, batch), live(session, batch)
            assert [h.shape for h in got.hidden] == [(len(indices), 1, d)] * (layers + 1)
            want = attrs.evolve(full, hidden=tuple(h[:, :1] for h in full.hidden), attn=None)
            assert_same_features(got, want)
            with torch.no_grad():
                student = session.host.extract_features("student", session.student, batch, ALL)
                torch.testing.assert_close(cls_cost(student, got, ctx.state["costs.W_h"]),
                                           cls_cost(student, full, ctx.state["costs.W_h"]), atol=1e-6, rtol=1e-5)
    assert sum(forwarded) == len(session.train) and cache.length is None  # nothing padded for storage
    assert {cache.memory[i]["hidden"].shape for i in cache.memory} == {(layers + 1, 1, d)}
    full_cache, _ = new_cache(session, needs=frozenset({"logits", "hidden"}))
    full_cache.features([0], one)
    assert cache.memory[0]["hidden"].numel() * full_cache.length == full_cache.memory[0]["hidden"].numel()


@pytest.mark.parametrize(("dtype", "rel"), [("bf16", 2e-2), ("fp16", 2e-3)])
def test_half_storage_error_is_small(smoke, dtype, rel):
    """bf16 / fp16 storage: values rounded once; loss terms stay within a few 1e-3 (bf16)."""
    session, ctx = smoke
    cache, _ = new_cache(session, dtype=dtype)
    indices = list(range(16))
    batch = collate(session.train, indices, torch.device("cpu"))
    cache.features(indices, batch)
    got, want = cache.features(indices, batch), live(session, batch)
    assert all(h.dtype == torch.float32 for h in got.hidden)  # handed back in the forward's dtype
    assert cache.stats()["bytes"] < sum(
        t.numel() * 4 for i in indices for t in cache.memory[i].values() if isinstance(t, torch.Tensor))
    terms_got, terms_want = loss_terms(session, ctx, got, batch), loss_terms(session, ctx, want, batch)
    for name, value in terms_want.items():
        assert math.isclose(terms_got[name], value, rel_tol=rel), (name, terms_got[name], value)


def test_budget_stops_storing_and_computes_the_rest_live(smoke):
    session, _ = smoke
    probe, _ = new_cache(session)
    probe.features([0], collate(session.train, [0], torch.device("cpu")))
    per_example = probe.stats()["bytes"]
    cache, forwarded = new_cache(session, max_bytes=int(per_example * 10.5))
    for epoch in (0, 1):
        for indices in batches(session, 16, epoch):
            batch = collate(session.train, indices, torch.device("cpu"))
            assert_same_features(cache.features(indices, batch), live(session, batch))
    stats = cache.stats()  # examples differ in size (attention keeps each one's real keys)
    assert stats["full"] and 1 <= stats["examples"] < len(session.train) and stats["bytes"] <= 10.5 * per_example
    assert stats["hits"] == stats["examples"] and stats["misses"] == 2 * len(session.train) - stats["examples"]
    assert sum(forwarded) == stats["misses"]


def test_a_full_disk_stops_storing_and_the_stage_goes_on_live(smoke, tmp_path, monkeypatch):
    """A write that fails (no space left) is not the run's end: one warning, nothing more stored,
    every batch still the live forward's features."""
    session, _ = smoke
    writes = []

    def disk_fills_at_the_fifth_file(path, write, **kwargs):
        writes.append(path.name)
        if path.suffix == ".pt" and len([w for w in writes if w.endswith(".pt")]) >= 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return atomic_write(path, write, **kwargs)

    monkeypatch.setattr(teacher_cache, "atomic_write", disk_fills_at_the_fifth_file)
    cache, forwarded = new_cache(session, directory=tmp_path / "k")
    with pytest.warns(KdframeWarning) as warned:
        for epoch in (0, 1):
            for indices in batches(session, 16, epoch):
                batch = collate(session.train, indices, torch.device("cpu"))
                assert_same_features(cache.features(indices, batch), live(session, batch))
    assert [str(w.message) for w in warned] == [
        f"teacher feature cache {tmp_path / 'k'}: cannot write (No space left on device): nothing more is stored,"
        " the rest of the stage runs the teacher live"]
    stats = cache.stats()
    assert stats["full"] and stats["write_error"] == "No space left on device"
    assert stats["examples"] == 4 == len(list((tmp_path / "k").glob("*.pt")))
    assert stats["hits"] == 4 and stats["misses"] == 2 * len(session.train) - 4 == sum(forwarded)


# -- the key -------------------------------------------------------------------------------------

def test_key_changes_with_weights_needs_data_and_settings(smoke):
    session, _ = smoke
    teacher, tokenizer, split = session.teacher.model, session.student.tokenizer, session.train

    def key(model=teacher, split=split, max_length=48, needs=ALL, dtype="fp32", precision="fp32"):
        return cache_key(key_parts(model, tokenizer, split, max_length, needs, dtype, precision))

    base = key()
    assert key() == base
    changed = [key(needs=frozenset({"logits"})), key(needs=frozenset({"logits", "cls"})), key(max_length=64), key(dtype="bf16"), key(precision="bf16"),
               key(split=attrs.evolve(split, table=split.table.slice(0, len(split) - 1)))]
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    changed.append(key(model=other))
    assert len({base, *changed}) == len(changed) + 1


# -- disk ----------------------------------------------------------------------------------------

def test_disk_cache_is_reused_by_a_new_cache_and_survives_a_torn_file(smoke, tmp_path):
    session, _ = smoke
    first, forwarded = new_cache(session, directory=tmp_path / "k")
    indices = list(range(8))
    batch = collate(session.train, indices, torch.device("cpu"))
    want = first.features(indices, batch)
    assert forwarded == [8] and len(list((tmp_path / "k").glob("*.pt"))) == 8
    (tmp_path / "k" / "3.pt").write_bytes(b"torn")
    entry = torch.load(tmp_path / "k" / "5.pt", weights_only=True)
    torch.save({**entry, "hidden": entry["hidden"][:, :-1]}, tmp_path / "k" / "5.pt")  # loads, but too short
    second, forwarded = new_cache(session, directory=tmp_path / "k")
    got = second.features(indices, batch)
    assert forwarded == [2]  # only the torn one and the wrong one
    assert_same_features(got, want, atol=0)
    assert second.stats()["hits"] == 6 and second.stats()["misses"] == 2
    torch.load(tmp_path / "k" / "3.pt", weights_only=True)  # rewritten


# -- the recipe section --------------------------------------------------------------------------

def test_recipe_section_defaults_off_and_stays_out_of_resolved_recipes():
    loaded = read_recipe(KD)
    assert not loaded.problems and not loaded.recipe.teacher_cache.enabled
    assert "teacher_cache" not in to_plain(loaded.recipe)  # run directories made before it still resume
    recipe = read_recipe(KD, "teacher_cache.enabled=true", 'teacher_cache.storage="disk"').recipe
    assert to_plain(recipe)["teacher_cache"] == {"enabled": True, "max_bytes": 4_000_000_000, "dtype": "fp32",
                                                 "storage": "disk"}
    assert read_recipe(KD, "teacher_cache.max_bytes=-1").problems == ["teacher_cache.max_bytes: must be >= 0, got -1"]


# -- end to end through the engine ---------------------------------------------------------------

@pytest.fixture
def teacher_forwards(monkeypatch):
    """Examples run through the teacher by training steps (DistillStep.features, role teacher, in a
    stage with a run directory: the dry-run plan has none, and evaluations call the hook directly)."""
    counted = []
    features = DistillStep.features

    def counting(self, role, loaded, batch):
        if role == "teacher" and self.ctx.run_dir is not None:
            counted.append(batch["input_ids"].shape[0])
        return features(self, role, loaded, batch)

    monkeypatch.setattr(DistillStep, "features", counting)
    return counted


def test_kd_ablation_runs_the_teacher_once_per_example(tmp_path, teacher_forwards):
    """Two cells of a KD ablation (seeds 1, 2) with the disk cache: the first runs each training
    example through the teacher once over its two epochs, the second not at all."""
    sets = ["teacher_cache.enabled=true", 'teacher_cache.storage="disk"']
    first = run(str(KD), overrides=sets, out=str(tmp_path / "seed1"), progress="off").summary
    stats = first["stages"]["distil"]["teacher_cache"]
    assert sum(teacher_forwards) == 64 and stats["misses"] == 64 and stats["hits"] == 64
    assert stats["storage"] == "disk" and stats["bytes"] > 0
    teacher_forwards.clear()
    second = run(str(KD), overrides=[*sets, "seed=2"], out=str(tmp_path / "seed2"), progress="off").summary
    stats = second["stages"]["distil"]["teacher_cache"]
    assert sum(teacher_forwards) == 0 and stats["misses"] == 0 and stats["hits"] == 128
    summary = json.loads((tmp_path / "seed2" / "summary.json").read_text())
    assert summary["stages"]["distil"]["teacher_cache"]["key"] == stats["key"]


def test_a_pkd_run_stores_cls_vectors_only_and_trains_as_without_the_cache(tmp_path):
    """PKD reads [CLS] vectors: its disk cache holds (layers + 1, 1, d) per example, and the run's
    training records match a run without the cache."""
    pkd = ROOT / "recipes" / "smoke" / "pkd.toml"
    sets = ["teacher_cache.enabled=true", 'teacher_cache.storage="disk"', f'data.cache_dir="{tmp_path / "c"}"']
    cached = run(str(pkd), overrides=sets, out=str(tmp_path / "cached"), progress="off").summary
    stats = cached["stages"]["distil"]["teacher_cache"]
    assert stats["hits"] == stats["misses"] == 64
    entry = torch.load(tmp_path / "c" / "teacher-features" / stats["key"] / "0.pt", weights_only=True)
    assert entry["hidden"].shape == (4 + 1, 1, 32) and set(entry["dtypes"]) == {"logits", "hidden"}
    run(str(pkd), out=str(tmp_path / "live"), progress="off")

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"distil"' in line]

    for got, want in zip(records("cached"), records("live"), strict=True):
        assert got.keys() == want.keys()
        for key in ("loss", "pt", "pred", "hard", "f1"):
            if key in want:
                assert math.isclose(got[key], want[key], rel_tol=1e-4), (key, got, want)


def test_bf16_smoke_run_with_cache_has_finite_losses(tmp_path):
    """bf16 autocast on the CPU, all four EMD terms, cache on; then an fp32 trainer in the same
    process (ablation cells of both precisions run in one process)."""
    sets = ['precision="bf16"', "teacher_cache.enabled=true", "teacher.train.max_steps=2"]
    summary = run(str(SMOKE), overrides=sets, out=str(tmp_path / "run"), progress="off").summary
    assert summary["stages"]["distil"]["teacher_cache"]["hits"] == 64
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["stage"] == "distil" and "loss" in r]
    assert train and all(math.isfinite(r[k]) for r in train for k in ("loss", "att", "hid", "emb", "pred"))
    assert summary["stages"]["distil"]["skipped_steps"] == 0
    trainer = Trainer(prepare(SMOKE, [], load_data=False), run_dir=None, progress=None)
    assert trainer.accelerator.mixed_precision == "no"
