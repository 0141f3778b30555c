"""The ``kdframe`` command. Exit codes: 0 ok, 1 a run failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import attrs

from kdframe.errors import Interrupted, KdframeError, KdframeWarning, RunFailed


def _common(parser: argparse.ArgumentParser, overrides: bool = True) -> None:
    if overrides:
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                            help="override a recipe field, e.g. stages[0].lr=2e-5 (value is a TOML literal)")
    parser.add_argument("-p", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="load a plugin module; -p no:NAME blocks an installed plugin")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def build_parser(plugin_hook: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdframe", description="Knowledge distillation for BERT-family models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train as a recipe says")
    run.add_argument("recipe")
    run.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    run.add_argument("--progress", choices=["rich", "plain", "off", "auto"], default="auto")
    _common(run)

    validate = sub.add_parser("validate", help="check a recipe and print the resolved recipe and plan")
    validate.add_argument("recipe")
    _common(validate)

    plugins = sub.add_parser("plugins", help="list loaded plugins and their strategies")
    plugins.add_argument("--json", action="store_true",
                         help="print plugins, strategies (with their params' JSON Schema), sources and tasks as JSON")
    _common(plugins, overrides=False)

    schema = sub.add_parser("schema", help="print the JSON Schema of recipes (for editors), with the loaded plugins")
    schema.add_argument("--out", help="write it to this file instead")
    _common(schema, overrides=False)

    export = sub.add_parser("export", help="write a run's student in its model framework's own format, with a"
                                           " model card (README.md)")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload it to this Hugging Face hub model"
                                                              " repository (OWNER/NAME; created if missing)")
    export.add_argument("--private", action="store_true", help="a new hub repository is private")
    _common(export, overrides=False)

    ablate = sub.add_parser("ablate", help="run a grid of recipe variants x tasks x seeds and report")
    ablate.add_argument("grid")
    ablate.add_argument("--out", help="ablation directory (default runs/ablation-<name>)")
    ablate.add_argument("--resume", action="store_true", help="continue an interrupted ablation in --out")
    ablate.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    ablate.add_argument("--progress", choices=["rich", "plain", "off", "auto"], default="auto")
    ablate.add_argument("--shard", metavar="I/N", help="run only the cells whose index %% N == I (one machine's share)")
    ablate.add_argument("--on", choices=["local", "ray"], default="local",
                        help="where cells run: this machine's processes, or tasks on a Ray cluster (kdframe[ray])")
    ablate.add_argument("--ray-address", help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    _common(ablate, overrides=False)

    report = sub.add_parser("report", help="tables and plots for a run or ablation directory")
    report.add_argument("dir")
    _common(report, overrides=False)

    cache = sub.add_parser("cache", help="list what the cache holds (fine-tuned teachers, teacher features, data),"
                                         " and remove what runs would recompute")
    cache.add_argument("--dir", help="the cache root (default $KDFRAME_CACHE, else ~/.cache/kdframe)")
    cache.add_argument("--remove", action="append", choices=["teachers", "teacher-features"], default=[],
                       help="remove these entries (a run fine-tunes or computes them again); repeatable")
    cache.add_argument("--unused-for", type=float, metavar="DAYS",
                       help="with --remove: only entries no run has written or opened for DAYS days")
    cache.add_argument("--dry-run", action="store_true", help="with --remove: say what would go, remove nothing")
    _common(cache, overrides=False)

    new_plugin = sub.add_parser("new-plugin", help="scaffold a third-party plugin package")
    new_plugin.add_argument("name")
    new_plugin.add_argument("--out", default=".", help="parent directory of the new package")
    _common(new_plugin, overrides=False)

    if plugin_hook is not None:
        for command in (run, validate):
            plugin_hook(command)
    return parser


def _preparse_plugins(argv: list[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-p", dest="plugins", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    return known.plugins


_SHOW_WARNING = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """kdframe's own warnings as one line, like its errors; the others as Python shows them."""
    if issubclass(category, KdframeWarning):
        print(f"kdframe: warning: {message}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    warnings.showwarning = _show_warning
    try:
        from kdframe.plugins import load_plugins

        host = load_plugins(_preparse_plugins(argv))
        parser = build_parser(host.add_cli_options)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help exits 0, usage errors 2, with their message
            return int(exc.code or 0)
        return COMMANDS[args.command](args)
    except SystemExit as exc:  # a plugin's code exiting: never a silent success, never a traceback
        if debug:
            traceback.print_exc()
        print(f"kdframe: run failed: plugin code called exit({exc.code!r})", file=sys.stderr)
        return 1
    except KdframeError as exc:
        if debug:
            traceback.print_exc()
        print(f"kdframe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunFailed as exc:
        if debug:
            traceback.print_exc()
        print(f"kdframe: run failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"kdframe: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file kdframe writes or reads went wrong under it (space, permissions, a lost disk)
        if debug:
            traceback.print_exc()
        where = f" {exc.filename}" if exc.filename else ""
        print(f"kdframe: run failed: cannot write or read{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdframe: aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        traceback.print_exc()
        print(f"kdframe: run failed with an unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    from kdframe.library import run

    if args.resume and args.out:
        raise KdframeError("--out and --resume cannot be used together: --resume DIR continues the run in DIR")
    summary = run(args.recipe, overrides=args.overrides, plugins=args.plugins, out=args.out, resume=args.resume,
                  progress=args.progress, options=vars(args)).summary
    if os.environ.get("RANK", "0") != "0":
        return 0  # under a launcher, the main process reports
    from rich.console import Console

    student = summary["student"]
    metric = summary["main_metric"]
    line = f"student dev {metric}: best {student['best'][metric]:.4f} (step {student['best_step']}), final {student['final'][metric]:.4f}"
    if "teacher" in summary:
        line += f"; teacher {summary['teacher']['dev'][metric]:.4f}"
    Console(stderr=True).print(line)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kdframe.session import prepare

    session = prepare(args.recipe, args.overrides, args.plugins)
    from kdframe.plan import plan  # torch: imported once the recipe is known to be valid

    stages = plan(session)
    console = Console()
    console.print("[bold]Resolved recipe[/bold]")
    console.print(session.resolved_toml(), markup=False, highlight=False)
    console.print("[bold]Plan[/bold]")
    console.print(f"task {session.task.name}: {len(session.train)} train / {len(session.dev)} dev examples,"
                  f" metric {session.task.main_metric}")
    if session.needs_teacher:
        t = session.teacher
        console.print(f"teacher: {t.description}")
    st = session.student
    console.print(f"student: {st.description}")
    for entry in stages:
        losses = ", ".join(f"{k}={v:g}" for k, v in entry.losses.items())
        console.print(f"stage {entry.stage!r}: mapping {entry.mapping or 'none'}, weighting {entry.weighting or 'none'},"
                      f" losses {losses}; features {', '.join(entry.needs) or 'logits only'}")
        for kind, flow in entry.flows.items():
            console.print(f"initial {kind} flow (student layer x teacher layer), first dev batch:")
            console.print(flow_table(flow), markup=False, highlight=False, soft_wrap=True)
    console.print("[green]recipe is valid[/green]")
    return 0


def flow_table(flow: list[list[float]]) -> str:
    """A flow as aligned plain text, 6 characters a column: a 12-layer teacher fits 80 columns,
    in a terminal or piped to a file alike."""
    lines = ["  S\\T" + "".join(f"{j:>6}" for j in range(1, len(flow[0]) + 1))]
    lines += [f"{i:>6}" + "".join(f"{v:>6.3f}" if v else "     ." for v in row) for i, row in enumerate(flow, 1)]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from kdframe.plugins import load_plugins

    host = load_plugins(args.plugins)
    if args.json:
        print(json.dumps(plugins_json(host), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kdframe plugins")
    for column in ("name", "version", "source", "hooks", "registers"):
        table.add_column(column)
    for info in host.infos:
        table.add_row(info.name, info.version, info.source, ", ".join(host.hooks_of(info.name)),
                      ", ".join(host.registry.by_plugin(info.name)))
    Console(width=200).print(table)
    return 0


def plugins_json(host: Any) -> dict[str, Any]:
    """What ``kdframe plugins --json`` prints: everything the loaded plugins registered."""
    from kdframe.schema import params_schema

    registry = host.registry
    return {
        "plugins": [{**attrs.asdict(info), "hooks": host.hooks_of(info.name), "registers": registry.by_plugin(info.name)}
                    for info in host.infos],
        # Every field of the Strategy (its flags included, whichever a later version adds), params as a schema.
        "strategies": [{**attrs.asdict(s, recurse=False), "needs": sorted(s.needs), "params": params_schema(s.params)}
                       for s in registry.all()],
        "data_sources": [{"name": d.name, "plugin": d.plugin, "description": d.description,
                          "defines_tasks": d.task is not None, "params": params_schema(d.params)}
                         for d in registry.data_sources()],
        "tasks": [{"name": t.name, "source": t.source, "plugin": t.plugin, **attrs.asdict(t.info)}
                  for t in registry.tasks()],
        "model_sources": [attrs.asdict(m) for m in registry.model_sources()],
    }


def cmd_schema(args: argparse.Namespace) -> int:
    from kdframe.plugins import load_plugins
    from kdframe.schema import recipe_schema

    text = json.dumps(recipe_schema(load_plugins(args.plugins).registry), indent=2) + "\n"
    if args.out:
        from kdframe.fileio import atomic_write

        atomic_write(Path(args.out), lambda f: f.write(text.encode()))
        print(args.out)
    else:
        print(text, end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kdframe.runs import export

    print(export(args.run_dir, args.out_dir, args.plugins, args.push_to_hub, args.private))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from kdframe.ablate import run_ablation

    return run_ablation(args.grid, args.out, args.resume, args.jobs, args.progress, args.plugins, args.shard,
                        args.on, args.ray_address)


def cmd_report(args: argparse.Namespace) -> int:
    from kdframe.report import write_report

    for path in write_report(args.dir):
        print(path)
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from kdframe.scaffold import new_plugin

    print(new_plugin(args.name, args.out))
    return 0


def _bytes(n: int) -> str:
    """A size in decimal units (as ``du --si``)."""
    power = min(len(str(max(n, 1))) - 1, 9) // 3
    return f"{n} B" if power == 0 else f"{n / 1000 ** power:.1f} {('KB', 'MB', 'GB')[power - 1]}"


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from kdframe.caches import cache_inventory, cache_root, remove_entry
    from kdframe.recipe import DataSpec

    if args.unused_for is not None and args.unused_for < 0:
        raise KdframeError(f"--unused-for: must be >= 0 days, got {args.unused_for:g}")
    if (args.unused_for is not None or args.dry_run) and not args.remove:
        raise KdframeError("--unused-for and --dry-run go with --remove teachers|teacher-features")
    root = Path(args.dir).expanduser() if args.dir else cache_root(DataSpec())
    if not root.is_dir():
        if args.dir:
            raise KdframeError(f"--dir: no cache directory at {root}")
        print(f"nothing cached yet: {root} does not exist")
        return 0
    entries = cache_inventory(root)
    now = time.time()
    if not args.remove:
        print(f"cache {root}: {_bytes(sum(e.bytes for e in entries))}")
        for kind in ("teachers", "teacher-features", "other"):
            of_kind = [e for e in entries if e.kind == kind]
            if of_kind:
                print(f"{kind}: {len(of_kind)}, {_bytes(sum(e.bytes for e in of_kind))}")
            for e in of_kind:
                used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used))
                about = [e.about] if e.about else []
                about += [f"also linked from {e.links} run directories"] if e.links else []
                print("  ".join([f"  {e.path.name}", _bytes(e.bytes), f"used {used}", *about]))
        return 0
    cutoff = now - 86400 * (args.unused_for or 0)
    chosen = [e for e in entries if e.kind in args.remove and e.used <= cutoff]
    for e in chosen:
        if not args.dry_run:
            remove_entry(e)
        shared = f" (linked from {e.links} run directories: frees nothing until they go)" if e.links else ""
        print(f"{'would remove' if args.dry_run else 'removed'} {e.kind}/{e.path.name}: {_bytes(e.bytes)}{shared}")
    print(f"{len(chosen)} entries, {_bytes(sum(e.bytes for e in chosen))}"
          f"{' would be' if args.dry_run else ''} removed; {len(entries) - len(chosen)} kept")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "schema": cmd_schema,
    "export": cmd_export,
    "ablate": cmd_ablate,
    "report": cmd_report,
    "new-plugin": cmd_new_plugin,
    "cache": cmd_cache,
}


if __name__ == "__main__":
    sys.exit(main())
