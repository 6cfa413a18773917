"""Does a seed repeat its training bit for bit, and which kernel settings change the bits?

What it measures: one allocation of benchmarks/exhaustive.small_space (default FFN-up layers 1-5 r1) trained for
--steps optimizer steps on a shipped space's data and recipe by the plain PEFT loop (`_common.plain_train`, the loop
a Ray Train worker runs), each time in a fresh Python process, once per setting: as installed (twice), 2 threads
instead of 1, MKL_CBWR=AVX2, MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default, and both pins of README
"Reproducibility" (MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2, twice). Per setting: a SHA-256 of the trained weights (LoRA
and head), whether they equal the first run's bit for bit, the largest absolute difference from them, the mean
training loss and the wall time. The same seed in the same setting must repeat; another setting may differ in its last
bits, which is what another machine's CPU changes (its kernels).

Target: none (it says what a seed's exact floats depend on; README "Reproducibility").

Run (from the repository root):
    python benchmarks/reproducibility.py --quick   # smoke: 300 train examples, max_length 64, 5 steps
    python benchmarks/reproducibility.py           # Reuters R8 (search_spaces/reuters_r8.yaml), 20 steps at its lr
Writes <out>/reproducibility.{csv,md} (default results/benchmarks/, --quick results/benchmarks/quick/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import pandas as pd  # noqa: E402

SPACE = C.ROOT / "search_spaces" / "reuters_r8.yaml"
AS_INSTALLED = {}
PINNED = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# (environment, torch threads): the first is the reference every other is compared with
SETTINGS = [(AS_INSTALLED, 1), (AS_INSTALLED, 1), (AS_INSTALLED, 2), ({"MKL_CBWR": "AVX2"}, 1),
            ({"MKL_CBWR": "COMPATIBLE"}, 1), ({"ATEN_CPU_CAPABILITY": "default"}, 1), (PINNED, 1), (PINNED, 1)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 train examples, max_length 64, 5 steps")
    parser.add_argument("--space", type=Path, default=SPACE, help="the shipped space whose data and recipe to use")
    parser.add_argument("--label", default="ffn_up L1-5 r1", help="a label of benchmarks/exhaustive.small_space")
    parser.add_argument("--steps", type=int, help="optimizer steps per training (default 20; --quick 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON: one training, run by the parent in a new process
    C.add_out_argument(parser)
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    return args


def setting_name(env: dict, threads: int) -> str:
    return " ".join([f"{k}={v}" for k, v in env.items()] + [f"{threads} threads"] * (threads > 1)) or "as installed"


def allocations(model_name: str, num_labels: int) -> dict:
    """benchmarks/exhaustive.small_space of the model: label → Allocation."""
    from exhaustive import small_space

    from orchestrator.models import adaptable_modules, load_model

    return small_space(adaptable_modules(load_model(model_name, num_labels)), quick=False)


def check_label(args) -> None:
    """An unknown --label stops here, in one line, before any training."""
    from orchestrator.config import load_config

    known = allocations(load_config(args.space, []).model.name, 2)
    if args.label not in known:
        print(f"--label: {args.label!r} is not a label of benchmarks/exhaustive.small_space; pick from {sorted(known)}",
              file=sys.stderr)
        raise SystemExit(2)


def train_once(args, threads: int, weights_file: Path) -> dict:
    """In the child process: one training; its weights to `weights_file` (safetensors), what it measured returned."""
    from safetensors.torch import save_file

    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.train import cpu_kernels

    cfg = load_config(args.space, C.run_overrides(Path(tempfile.gettempdir()), [args.seed], args.quick))
    task = load_task(cfg.data)
    allocation = allocations(cfg.model.name, task.num_labels)[args.label]
    result = C.plain_train(task, allocation, model_name=cfg.model.name, max_length=cfg.model.max_length,
                           batch_size=cfg.train.batch_size, lr=cfg.train.lr, warmup_ratio=cfg.train.warmup_ratio,
                           seed=args.seed, threads=threads, evaluate_every_epoch=False, max_steps=args.steps)
    save_file({name: t.contiguous() for name, t in result.trained.items()}, str(weights_file))
    digest = hashlib.sha256(b"".join(result.trained[name].numpy().tobytes() for name in sorted(result.trained)))
    return {"sha256": digest.hexdigest()[:16], "train_loss": result.metrics[-1]["train_loss"],
            "train_s": sum(result.epoch_train_s), "kernels": cpu_kernels(), "lr": cfg.train.lr}


def run_setting(args, env: dict, threads: int, weights_file: Path) -> dict:
    """One training in a fresh process under `env` (the kernel pins removed from the inherited environment first)."""
    from orchestrator.pipeline import KERNEL_PINS

    child_env = {k: v for k, v in os.environ.items() if k not in KERNEL_PINS} | env
    child = json.dumps({"threads": threads, "weights": str(weights_file)})
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--space", str(args.space),
            "--label", args.label, "--steps", str(args.steps), "--seed", str(args.seed)]
    done = subprocess.run(argv + ["--quick"] * args.quick, env=child_env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the training under {setting_name(env, threads)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rows: list[dict], weights: list[Path]) -> pd.DataFrame:
    """Each training against the first: bit-identical or not, and the largest absolute weight difference."""
    from safetensors.torch import load_file

    reference = load_file(str(weights[0]))
    frame = pd.DataFrame(rows)
    diffs = []
    for path in weights:
        trained = load_file(str(path))
        diffs.append(max(float((trained[k] - reference[k]).abs().max()) for k in reference))
    return frame.assign(identical=frame.sha256 == frame.sha256[0], max_abs_diff=diffs)


def verdict(table: pd.DataFrame) -> str:
    repeats = table[table.setting == table.setting[0]].identical.all()
    pinned = table[table.setting == setting_name(PINNED, 1)]
    changed = table[~table.identical].setting.unique().tolist()
    return (f"The same seed in a fresh process, as installed: **{'bit-identical' if repeats else 'NOT bit-identical'}**. "
            f"Pinned twice: **{'bit-identical' if pinned.sha256.nunique() == 1 else 'NOT bit-identical'}**. "
            f"Settings whose weights differ from the first run's: {', '.join(changed) or 'none'}.")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child = json.loads(args.child)
        print(json.dumps(train_once(args, child["threads"], Path(child["weights"]))), flush=True)
        return
    ctx = C.start()
    check_label(args)
    rows, weights = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (env, threads) in enumerate(SETTINGS):
            weights.append(Path(tmp) / f"{i}.safetensors")
            started = time.perf_counter()
            row = run_setting(args, env, threads, weights[-1])
            rows.append({"setting": setting_name(env, threads), **row, "process_s": time.perf_counter() - started})
            print(f"{rows[-1]['setting']}: {row['sha256']} ({row['train_s']:.0f} s)", flush=True)
        table = compare(rows, weights)
    text = "\n\n".join([
        f"# Reproducibility: the same training under kernel settings ({args.label}, {args.space.name})",
        f"Command: `{C.invoked_command(__file__)}` · {time.strftime('%Y-%m-%d %H:%M')} · load after {C.load_now()} · "
        f"{C.context_line(ctx)}",
        f"Each row: {args.steps} optimizer steps at lr {rows[0]['lr']:g}, seed {args.seed}, in a fresh process; the "
        "first row is the reference. train_s: the steps' wall time (load noise included).",
        C.md_table(table[["setting", "kernels", "sha256", "identical", "max_abs_diff", "train_loss", "train_s"]],
                   floatfmt=".3g"),
        verdict(table), C.NOISE_NOTE])
    C.write_results(C.out_dir(args), "reproducibility", table, text + "\n")


if __name__ == "__main__":
    main()
