"""The model card ``kdframe export`` writes beside an exported student (README.md, in the Hugging
Face hub's format: YAML metadata, then markdown), and ``--push-to-hub``.

Everything in the card comes from the run directory (summary.json, the resolved recipe,
teacher.json) and from the models as the export loads them: parameter counts, and a forward pass
of each model timed on this machine (the speed-up), the teacher's license and origin as its
loader reports them (``LoadedModel.card``).
"""

from __future__ import annotations

import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from kdframe.errors import KdframeError, RunFailed
from kdframe.fileio import atomic_write
from kdframe.network import hub_endpoint_unreachable

SPEED_BATCH = 8  # examples per timed forward
SPEED_REPEATS = 5


def measure_speed(session: Any, length: int) -> dict[str, Any]:
    """Forward times (ms) of the student and, where the run has one, the teacher."""
    speed = {"length": length, "device": "CPU", "threads": torch.get_num_threads(),
             "student": forward_ms(session.host, "student", session.student, length)}
    if session.teacher is not None:
        speed["teacher"] = forward_ms(session.host, "teacher", session.teacher, length)
    return speed


def forward_ms(host: Any, role: str, loaded: Any, length: int) -> float:
    """The median time (ms) of one forward of ``loaded`` on SPEED_BATCH x ``length`` tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if loaded.vocab_size > 2000 else 1, loaded.vocab_size, (SPEED_BATCH, length),
                        generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loaded.model.eval()
    times = []
    with torch.no_grad():
        for repeat in range(SPEED_REPEATS + 1):  # the first one warms up
            started = time.perf_counter()
            host.extract_features(role, loaded, batch, frozenset())
            if repeat:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def render(session: Any, summary: dict[str, Any], resolved_toml: str, speed: dict[str, Any]) -> str:
    """README.md for the exported student of the run ``summary`` describes."""
    from huggingface_hub import EvalResult, ModelCardData

    import kdframe

    recipe, task, student = session.recipe, session.task, session.student
    teacher = summary.get("teacher")
    facts = session.teacher.card if session.teacher is not None else student.card
    best = summary["student"]["best"] or summary["student"]["final"]
    names = list(best)
    kind = "regression" if task.is_regression else f"{task.num_labels} classes"
    data = ModelCardData(
        license=facts.get("license"), library_name=student.card.get("library_name"), base_model=facts.get("base_model"),
        pipeline_tag="text-classification", model_name=recipe.name,
        tags=["kdframe", "knowledge-distillation", *sorted({s.mapping.name for s in session.stages if s.mapping})],
        eval_results=[EvalResult(task_type="text-classification", dataset_type=task.name, dataset_name=task.name,
                                 dataset_split="dev", metric_type=name, metric_value=round(value, 4),
                                 metric_name=f"dev {name}") for name, value in best.items()])
    lines = [f"# {recipe.name}", "",
             f"A student model {'distilled' if teacher is not None else 'trained'} with kdframe {kdframe.__version__} for the task `{task.name}` ({kind};"
             f" data source `{recipe.data.source}`).", "",
             f"- Student: {student.description}"]
    if teacher is not None:
        lines.append(f"- Teacher: {teacher['description']} ({teacher.get('source', '')})")
    lines += ["", "## Dev scores", "", "| model | parameters | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    if teacher is not None:
        lines.append(f"| teacher | {teacher['params']:,} | " + " | ".join(_score(teacher['dev'].get(n)) for n in names) + " |")
    lines += [f"| student | {summary['student']['params']:,} | " + " | ".join(_score(best.get(n)) for n in names) + " |", "",
              f"The student is the model its last stage kept ({summary['student']['selected']}, chosen on dev"
              f" `{summary['main_metric']}`).", "", "## Size and speed", ""]
    timing = (f"one forward pass on {SPEED_BATCH} x {speed['length']} tokens, median of {SPEED_REPEATS}, on the machine"
              f" that exported it ({speed['device']}, {speed['threads']} threads)")
    if teacher is not None:
        lines.append(f"The student has {summary['student']['params'] / teacher['params']:.0%} of the teacher's"
                     f" parameters. Timed as {timing}: teacher {speed['teacher']:.1f} ms, student"
                     f" {speed['student']:.1f} ms, a speed-up of {speed['teacher'] / speed['student']:.2f}x.")
    else:
        lines.append(f"Timed as {timing}: {speed['student']:.1f} ms.")
    lines += ["", "## How it was made", "", *_stages(session, summary), "",
              "## Recipe", "", "The resolved recipe; `kdframe run` on it repeats the run:", "",
              "```toml", resolved_toml.rstrip(), "```", "", "## Sources and licenses", "",
              f"- Base model: {facts.get('base_model') or 'see the teacher above'}; license:"
              f" {facts.get('license') or 'not stated in its model card: see the model’s own terms'}.",
              f"- Data: task `{task.name}` of the data source `{recipe.data.source}`; see the dataset's own terms.",
              f"- Exported on {date.today().isoformat()}.", ""]
    return f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)


def _score(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _stages(session: Any, summary: dict[str, Any]) -> list[str]:
    lines = []
    if session.teacher_stage is not None and "teacher" in summary:
        t = session.teacher_stage.stage
        lines.append(f"- The teacher was fine-tuned on the task first ({t.epochs} epochs, lr {t.lr:g},"
                     f" batch {t.batch_size}).")
    for resolved in session.stages:
        stage = resolved.stage
        done = summary["stages"].get(stage.name, {})
        losses = ", ".join(f"{name} x {choice.weight:g}" for name, choice in resolved.losses.items())
        parts = [f"mapping `{resolved.mapping.name}`" if resolved.mapping else "no layer mapping",
                 f"weighting `{resolved.weighting.name}`" if resolved.weighting else "",
                 f"losses {losses}", f"{stage.epochs} epochs" if not stage.max_steps else f"{stage.max_steps} steps",
                 f"lr {stage.lr:g}", f"batch {stage.batch_size}"]
        stopped = f"; stopped early: {done['stopped']}" if done.get("stopped") else ""
        lines.append(f"- Stage `{stage.name}`: {', '.join(p for p in parts if p)}"
                     f" ({done.get('steps', '?')} steps in {done.get('wall_time_s', 0):.0f} s{stopped}).")
    return lines


def write(out: Path, text: str) -> Path:
    path = out / "README.md"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def check_repo_id(repo: str) -> None:
    """A hub model repository id is OWNER/NAME (asked before anything is exported)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        if repo.count("/") != 1:
            raise HFValidationError("it needs an owner")
    except HFValidationError as exc:
        raise KdframeError(f"--push-to-hub: {repo!r} is not a model repository id (OWNER/NAME): {exc}") from None


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Upload ``folder`` to the hub model repository ``repo`` (created if missing); its URL.
    Offline, a RunFailed in seconds, naming what was exported where."""
    offline = hub_endpoint_unreachable()
    if offline is not None:
        raise RunFailed(f"cannot push to the Hugging Face hub: it cannot be reached ({offline}); the export is in"
                        f" {folder}: push it later with `kdframe export ... --push-to-hub {repo}` or"
                        f" `hf upload {repo} {folder}`")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                   commit_message="Upload a student distilled with kdframe")
    except Exception as exc:  # auth, permissions, network: one line, the export stays on disk
        raise RunFailed(f"cannot push to the Hugging Face hub repository {repo}: {type(exc).__name__}: {exc};"
                        f" the export is in {folder}") from None
    return getattr(commit, "commit_url", f"https://huggingface.co/{repo}")
