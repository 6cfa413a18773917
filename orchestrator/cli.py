"""The `lora-search` command. Bad input prints one line naming the field and the fix, and exits 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from orchestrator.errors import Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Search where LoRA adapters go and how much rank each gets, under a parameter budget.")
console = Console()


CONFIG_ARG = typer.Argument(..., help="search space YAML, e.g. search_spaces/quickstart.yaml")
OVERRIDES_ARG = typer.Argument(None, help="key.sub=value overrides, e.g. train.epochs=2")
ADDRESS_OPT = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else local)")
WARM_START_OPT = typer.Option(None, "--warm-start", help="earlier run whose best allocations are trained too")


@app.command()
def run(config: Path = CONFIG_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same name"),
        address: Optional[str] = ADDRESS_OPT, warm_start: Optional[Path] = WARM_START_OPT):
    """Screen candidates with zero-cost proxies, train the survivors and baselines, write the report."""
    _run_pipeline(_config(config, overrides, warm_start), resume, address)


@app.command()
def screen(config: Path = CONFIG_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
           resume: bool = typer.Option(False, "--resume", help="continue an interrupted screen of the same name"),
           address: Optional[str] = ADDRESS_OPT, warm_start: Optional[Path] = WARM_START_OPT):
    """Screen only: score the candidates, pick the survivors and list what training would do; `train` goes on."""
    from orchestrator.report import terminal_table

    cfg = _config(config, overrides, warm_start)
    plan = _run_pipeline(cfg, resume, address, screen_only=True)
    rows = [[r.candidate_id, r.kind, r.label] + (["does not fit", "", ""] if r.unfit else
                                                 [f"{int(r.trainable_params):,}", str(int(r.modules)), str(int(r.total_rank))])
            + [f"{r.to_train} of {len(plan.attrs['seeds'])}" + (f", {r.failed} failed" if r.failed else "")]
            for r in plan.itertuples()]
    # ids whole, to be found in screen.csv and the report: a long one makes longer lines, not the last column cut off
    console.print(terminal_table("what `train` would do", ["candidate", "kind", "label", "params", "modules", "Σ rank",
                                                           "seeds to train"], rows, folding={}, left={"candidate", "kind", "label"}),
                  crop=False)
    for r in plan[plan.unfit != ""].itertuples():
        console.print(f"{r.label}: its training will fail: {r.unfit}")
    if cfg.train.lr_grid:
        console.print(f"train.lr_grid: each model first trains on its first seed at each of {len(cfg.train.lr_grid)} "
                      "rates (those done already are kept); its best is that seed's training")
    left, failed = plan.to_train.sum(), plan.failed.sum()
    console.print(f"Allocations: {cfg.run_dir}/screen.csv. " + (
        f"{left} training(s) left; run them with: lora-search train {cfg.run_dir}" if left else
        "Nothing to train: no screened model survived and train.baselines is empty" if plan.empty else
        f"Nothing left to train: the run is trained; its report: lora-search report {cfg.run_dir}"))
    if failed:  # a resume leaves a failed training as it is: the same config would fail the same way
        console.print(f"{failed} training(s) failed (the error is in trials/<job>.json); once the cause is fixed, "
                      f"delete that file and run: lora-search train {cfg.run_dir}")


@app.command()
def train(run_dir: Path = typer.Argument(..., help="a run directory that `screen` or `run` started, e.g. results/quickstart"),
          address: Optional[str] = ADDRESS_OPT):
    """Train a screened run's survivors and baselines, or finish an interrupted run, with the config it started with."""
    from orchestrator.pipeline import stored_config

    _run_pipeline(stored_config(run_dir), True, address, continue_with=f"`lora-search train {run_dir}`")


def _config(config: Path, overrides: Optional[list[str]], warm_start: Optional[Path]):
    from orchestrator.config import load_config

    return load_config(config, (overrides or []) + ([f"screen.warm_start_from={warm_start}"] if warm_start else []))


def _run_pipeline(cfg, resume: bool, address: Optional[str], screen_only: bool = False,
                  continue_with: str = "--resume"):
    """The pipeline, then its summary; the screen's training plan instead with `screen_only`. A stopped run says
    how to go on: `continue_with`, the command's own way to resume."""
    from orchestrator import pipeline, report

    try:
        table = pipeline.run(cfg, resume=resume, address=address, screen_only=screen_only)
    except Interrupted as err:  # Tune's fit() returned on Ctrl-C with work left
        raise Interrupted(f"{err}; continue with {continue_with}") from None
    except KeyboardInterrupt:  # outside Tune's fit()
        raise Interrupted(f"run '{cfg.name}' stopped; " + (f"continue with {continue_with}" if (cfg.run_dir / "run.json").is_file()
                                                          else "nothing was written; start it again")) from None
    if screen_only:
        return table
    run_info = report.read_run_json(cfg.run_dir)
    report.print_summary(table, run_info["task"]["majority_rate"], console, run_dir=cfg.run_dir)
    written = [name for name in ("report.md", "report.csv", "report.parquet", "screen.csv", "study.db", "adapters/")
               if (cfg.run_dir / name).exists()]  # study.db: unless screen.storage names another storage
    console.print(f"Results: {cfg.run_dir}/ ({', '.join(written)})")
    if run_info.get("copied_to"):
        console.print(f"Copied to: {run_info['copied_to']}")
    return table


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory, e.g. results/quickstart")):
    """Rebuild the report files of a finished run from its stored results (no training) and print the summary."""
    from orchestrator import report

    table = report.rebuild(run_dir)
    majority_rate = report.read_run_json(run_dir, "task.majority_rate")["task"]["majority_rate"]
    report.print_summary(table, majority_rate, console, run_dir=run_dir)
    console.print(f"Report: {run_dir}/ (report.html, report.md, report.csv, report.parquet, *.png)")


@app.command("validate-proxies")
def validate_proxies(config: Path = typer.Argument(..., help="search space YAML (its budget, space and training recipe)"),
                     overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides"),
                     n: int = typer.Option(20, "--n", help="allocations trained at the budget (±tolerance)"),
                     off_budget: int = typer.Option(4, "--off-budget", help="extra allocations at half and double the budget"),
                     resume: bool = typer.Option(False, "--resume", help="continue an interrupted validation"),
                     address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address")):
    """Train a spread of allocations and measure how well every proxy ranks them (ρ, τ, top-k, cost)."""
    from orchestrator.config import load_config
    from orchestrator.validate import run_validation

    cfg = load_config(config, overrides or [])
    try:
        summary = run_validation(cfg, n, off_budget, resume, address)
    except Interrupted as err:
        raise Interrupted(f"{err}; continue with --resume") from None
    console.print(summary.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    console.print(f"Written: {cfg.run_dir}/proxy_validation.{{csv,md,png}}")


@app.command()
def modules(model: str = typer.Option("minilm-l6", help="packaged model name or local Hugging Face directory")):
    """List the modules an adapter can go on, with the parameters one unit of rank costs there."""
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.report import terminal_table

    rows = [[m.short, f"{m.params_per_rank:,}", m.name] for m in adaptable_modules(load_model(model, num_labels=2))]
    # names whole, to be copied into routing.modules or an allocation: a long one makes longer lines, not folded ones
    console.print(terminal_table(f"modules of {model}", ["module", "params\nper rank", "name in the model"], rows,
                                 folding={}, left={"module", "name in the model"}), crop=False)


@app.command()
def dashboard(run_dir: Path = typer.Argument(..., help="a run directory, e.g. results/quickstart"),
              port: int = typer.Option(8080, "--port", help="port to listen on"),
              host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but 127.0.0.1 exposes the dashboard")):
    """Serve optuna-dashboard on the run's screen study (works while the run is still writing it)."""
    from orchestrator.dashboard import serve

    serve(run_dir, host=host, port=port)


@app.command()
def compare(run_dirs: list[Path] = typer.Argument(..., help="run directories, e.g. results/quickstart results/qs3"),
            out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: compare-<names> beside the first run)")):
    """Put finished runs side by side: best searched vs baselines, gain, cost and the settings that differ."""
    from orchestrator import report

    out_dir = out or report.default_compare_dir(run_dirs)
    table = report.compare(run_dirs, out_dir)
    report.print_compare(table, console)
    console.print(f"Comparison: {out_dir}/ (compare.md, compare.csv, compare.png)")


def _root_option():
    # --registry as well, so one spelling works for `compose` and the `registry` commands alike
    return typer.Option(Path("results/registry"), "--root", "--registry",
                        help="registry directory: registry.db (SQLite) + <name>/v<version>/")


@app.command()
def compose(adapters: str = typer.Option(..., "--adapters", help="registered adapters, comma-separated: NAME or NAME@VERSION"),
            task: str = typer.Option(..., "--task", help="the new task: built-in, a CSV/JSONL/Parquet file, or TASK:GROUP,GROUP "
                                     "(labels or patterns, '+' joins, e.g. newsgroups20:sci.med,sci.space)"),
            shots: int = typer.Option(16, "--shots", help="labelled examples per class the methods see"),
            method: str = typer.Option("all", "--method", help="uniform, learned or all (+ zero_shot, single_best, few_shot_training)"),
            out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: results/compose-<task>)"),
            register: Optional[str] = typer.Option(None, "--register", help="store the composed adapter (learned, else uniform) under NAME"),
            registry: Path = _root_option(),
            trials: int = typer.Option(40, "--trials", help="Optuna TPE trials of the learned weights"),
            l1: float = typer.Option(0.05, "--l1", help="penalty on the sum of |weights| (LoraHub)"),
            eval_size: int = typer.Option(1000, "--eval-size", help="cap on held-out eval examples"),
            max_length: int = typer.Option(128, "--max-length", help="tokens per example"),
            seed: int = typer.Option(0, "--seed", help="seed of the few-shot sample and the search"),
            model: Optional[str] = typer.Option(None, "--model", help="base model (default: the one the adapters were stored with)")):
    """Compose registered LoRA adapters for a new task from a few labelled examples; compare with the baselines."""
    from orchestrator.compose import METHODS, ComposeConfig, run_compose, summarise

    methods = METHODS if method == "all" else tuple(m.strip() for m in method.split(","))
    cfg = ComposeConfig(shots=shots, methods=methods, trials=trials, l1=l1, eval_size=eval_size, max_length=max_length,
                        seed=seed)
    out_dir = out or Path("results") / f"compose-{''.join(c if c.isalnum() or c in '-_.' else '-' for c in task)}"
    try:
        table, done = run_compose(registry, [a.strip() for a in adapters.split(",") if a.strip()], task, cfg, out_dir,
                                  register, model)
    except KeyboardInterrupt:  # registering is compose's last step and all-or-nothing: nothing was registered
        written = (f"'{out_dir}' may hold this run's adapters or report files beside older ones" if out_dir.exists()
                   else "nothing was written")
        raise Interrupted(f"compose stopped; nothing was registered; {written}; run it again") from None
    _say(summarise(table).drop(columns=["accuracy_std", "seeds"]).to_markdown(index=False, floatfmt=".4g"))
    if done["entry"] is not None:
        _say(f"Registered {_entry_line(done['entry'])}")
    _say(f"Written: {out_dir}/ (compose.csv, compose.md, compose.png, adapters/)")


# ---------------------------------------------------------------- registry (orchestrator/registry.py)

registry_app = typer.Typer(no_args_is_help=True,
                           help="Versioned, checksummed store of trained adapters (safetensors only; fp32, fp16 or int8).")


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _entry_line(entry) -> str:
    accuracy = entry.metrics.get("accuracy")
    acc = f", accuracy {accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    return (f"{entry.name} v{entry.version} ({entry.precision}, {entry.size_bytes:,} bytes{acc})"
            f"{' — current' if entry.current else ''}")


@registry_app.command("add")
def registry_add(run_dir: Path = typer.Argument(..., help="a finished run directory, e.g. results/quickstart"),
                 name: Optional[str] = typer.Option(None, "--name", help="registry name (default: the run's task)"),
                 candidate: Optional[str] = typer.Option(None, "--candidate", help="candidate_id (default: the best searched one by accuracy, validation accuracy where the run held some out)"),
                 precision: str = typer.Option("fp32", "--precision", help="storage precision: fp32, fp16 or int8"),
                 promote: bool = typer.Option(True, "--promote/--no-promote", help="make the new version current"),
                 root: Path = _root_option()):
    """Store a run's adapter as the next version of NAME (checksummed, safetensors only)."""
    from orchestrator.registry import Registry

    registry = Registry(root)
    before = {(e.name, e.version) for e in registry.list()}
    entry = registry.add_from_run(run_dir, candidate, name=name, precision=precision, promote=promote)
    said = "Already stored as" if (entry.name, entry.version) in before else "Added"  # add_from_run stores it once
    _say(f"{said} {_entry_line(entry)}; candidate {entry.metrics.get('candidate_id')} of {run_dir}")
    _say(f"Stored in {entry.path}/")


@registry_app.command("list")
def registry_list(root: Path = _root_option()):
    """Every stored version: name, version, current (*), precision, task, base model, accuracy, size."""
    from orchestrator.registry import Registry
    from orchestrator.report import terminal_table

    entries = Registry(root).list()
    if not entries:
        _say(f"The registry at {root} is empty; add an adapter with `lora-search registry add results/<run>`")
        return
    rows = [[e.name, str(e.version), "*" if e.current else "", e.precision, e.task, e.base_model,
             f"{e.metrics['accuracy']:.4f}" if isinstance(e.metrics.get("accuracy"), (int, float)) else "",
             f"{e.size_bytes:,}", f"v{e.parent_version}" if e.parent_version else "", e.created_at[:16].replace("T", " ")]
            for e in entries]
    columns = ["name", "ver", "cur", "prec", "task", "base model", "accuracy", "bytes", "parent", "created"]
    # name and version are what the other commands take: never folded, so they can be copied whole; a name too long
    # for the terminal makes the lines longer (crop=False), not the last columns cut off
    console.print(terminal_table("lora-search registry", columns, rows, left={"name", "cur", "prec", "parent"},
                                 folding={"task": 8, "base model": 8, "created": 10}), crop=False)


@registry_app.command("show")
def registry_show(name: str = typer.Argument(..., help="registry name"),
                  version: Optional[int] = typer.Option(None, "--version", help="version (default: the current one)"),
                  root: Path = _root_option()):
    """Everything recorded about one version, with the SHA-256 of each stored file."""
    from orchestrator.registry import Registry

    e = Registry(root).show(name, version)
    _say(_entry_line(e))
    for label, value in (("task", e.task), ("base model", f"{e.base_model} (SHA-256 {e.base_model_sha256})"),
                         ("parent", f"v{e.parent_version}" if e.parent_version else "-"), ("created", e.created_at),
                         ("source", e.source or "-"), ("allocation", e.allocation), ("path", f"{e.path}/")):
        _say(f"  {label:<11} {value}")
    _say("  metrics     " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.metrics.items()))
    for file, digest in e.files.items():
        _say(f"  file        {file}  SHA-256 {digest}")


@registry_app.command("promote")
def registry_promote(name: str = typer.Argument(..., help="registry name"),
                     version: int = typer.Argument(..., help="the version to make current"),
                     root: Path = _root_option()):
    """Make VERSION the current version of NAME."""
    from orchestrator.registry import Registry

    _say(f"Current: {_entry_line(Registry(root).promote(name, version))}")


@registry_app.command("rollback")
def registry_rollback(name: str = typer.Argument(..., help="registry name"), root: Path = _root_option()):
    """Make the version before the current one current again (later versions are kept)."""
    from orchestrator.registry import Registry

    entry = Registry(root).rollback(name)
    _say(f"Rolled back: {_entry_line(entry)}; later versions are kept (`lora-search registry promote {name} <version>`)")


@registry_app.command("remove")
def registry_remove(name: str = typer.Argument(..., help="registry name"),
                    version: int = typer.Argument(..., help="the version to delete (not the current one)"),
                    root: Path = _root_option()):
    """Delete one version's files (its number is never reused)."""
    from orchestrator.registry import Registry

    Registry(root).remove(name, version)
    _say(f"Removed {name} v{version}")


@registry_app.command("export")
def registry_export(name: str = typer.Argument(..., help="registry name"),
                    out_dir: Path = typer.Argument(..., help="new directory for the plain PEFT adapter"),
                    version: Optional[int] = typer.Option(None, "--version", help="version (default: the current one)"),
                    root: Path = _root_option()):
    """Write a version as a plain PEFT adapter directory (checksums verified; int8 dequantised) + registry_entry.json."""
    from orchestrator.registry import Registry

    out = Registry(root).export(name, version, out_dir)
    _say(f"Exported to {out}/ (adapter_model.safetensors, adapter_config.json, registry_entry.json)")


@registry_app.command("quantise")
def registry_quantise(run_dir: Path = typer.Argument(..., help="a finished run directory, e.g. results/quickstart"),
                      candidate: Optional[str] = typer.Option(None, "--candidate", help="candidate_id (default: the best searched one by accuracy, validation accuracy where the run held some out)"),
                      out: Optional[Path] = typer.Option(None, "--out", help="where quantisation.csv/.md go (default: RUN_DIR)")):
    """Size on disk and eval accuracy of the adapter stored as fp32, fp16 and int8 (re-evaluated on the run's eval split)."""
    from orchestrator.registry import quantisation_report, write_quantisation_report

    table = quantisation_report(run_dir, candidate)
    shown = table[["precision", "size_bytes", "size_vs_fp32", "accuracy", "accuracy_change_pts", "f1", "max_abs_weight_error"]]
    _say(f"Candidate {table.attrs['candidate_id']} ({table.attrs['label']}) of {run_dir}, "
         f"{table.attrs['eval_examples']} eval examples on {table.attrs['device']}; report accuracy {table.attrs['report_accuracy']}")
    _say(shown.to_markdown(index=False, floatfmt=".4g"))
    paths = write_quantisation_report(table, out or run_dir)
    _say(f"Written: {', '.join(str(p) for p in paths)}")


app.add_typer(registry_app, name="registry")


def _invoked_command() -> str:
    """`lora-search` and the command words of sys.argv (`lora-search registry add`): up to the first option or
    argument that names no (sub)command."""
    words, group = ["lora-search"], typer.main.get_command(app)
    for word in sys.argv[1:]:
        group = getattr(group, "commands", {}).get(word)
        if group is None:
            break
        words.append(word)
    return " ".join(words)


def main() -> None:
    """Bad input, ours or a usage error (unknown option or command, missing argument, bad value): one line, exit 2;
    Ctrl-C: one line, exit 130."""
    try:
        # not standalone: typer would print usage errors as a multi-line box; --help and ctx.exit return their code
        code = app(standalone_mode=False)
    except typer.TyperException as err:  # the base of typer's vendored click errors (click.UsageError is another class)
        if type(err).__name__ != "NoArgsIsHelpError":  # typer's check: its help is already printed when it is made
            # the command from argv, not click's context: it has none for some errors (an option missing its value)
            print(f"error: {' '.join(err.format_message().split()).rstrip('.')}; see '{_invoked_command()} --help'",
                  file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))
    except typer.Abort:  # EOF (or Ctrl-C) at a prompt
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:
        print(f"interrupted: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, the shell's code for Ctrl-C
    sys.exit(code if isinstance(code, int) else 0)  # commands return None; typer turns a bare Ctrl-C into 130


if __name__ == "__main__":
    main()
