#!/usr/bin/env python
"""Choose beta and the learning rate by measurement: short trainings over a small grid, then one table.

For each (beta, learning rate) of the grid the trainer runs --max_train_steps on your data, with held-out pairs
evaluated --evaluations times and --stop_on_collapse; the table gives, at each run's last held-out evaluation, the
implicit accuracy, the mean implicit reward margin, the share of negative margins and the policy/reference error
ratios on winners and losers, and marks the runs that collapsed (held-out winner ratio above --collapse_threshold).
The best healthy setting is the one with the highest held-out accuracy and, among equal accuracies, the lowest winner
ratio: the gentlest setting that learns the preference as well (docs/sweep.md).

    python examples/sweep.py --betas 1000 2500 5000 --learning_rates 1e-5 3e-5 --max_train_steps 200 \
        --num_validation_pairs 256 --output_dir sweep -- --dataset_name yuvalkirstain/pickapic_v2 --rank 16
    python examples/sweep.py --demo --betas 250 1000 5000 --learning_rates 1e-3 1e-2   # offline, the demo's data

Everything after `--` goes to the trainer (--trainer: train_diffusion_dpo.py, _sdxl, _sd3, _flux or _flux2). Each run's
folder (beta<b>-lr<lr>) and output (<folder>.log) go to --output_dir, with sweep_results.json; a setting already in
sweep_results.json with the same command is not run again.
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import repo_paths
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


COLUMNS = {  # logged name: table heading
    "eval/implicit_acc": "held-out accuracy",
    "eval/reward_margin": "reward margin",
    "eval/negative_margin_share": "negative margins",
    "eval/winner_ratio": "winner ratio",
    "eval/loser_ratio": "loser ratio",
}
# --demo: examples/alignment_demo.py's data (512 pairs, warm shapes preferred) and trainer settings
DEMO_FLAGS = [
    *("--pretrained_model_name_or_path", str(repo_paths.ROOT / "examples" / "assets" / "tiny-shapes-sd")),
    *("--resolution", "32", "--train_batch_size", "16", "--lr_scheduler", "constant", "--validation_timesteps", "5"),
]


def parse_args(input_args=None):
    argv = sys.argv[1:] if input_args is None else list(input_args)
    own, trainer_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    usage = "%(prog)s [options] -- [trainer flags]"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=usage)
    parser.add_argument("--trainer", default=str(repo_paths.ROOT / "train_diffusion_dpo.py"), help="trainer script")
    parser.add_argument("--betas", type=float, nargs="+", required=True, help="values of --beta_dpo")
    parser.add_argument("--learning_rates", type=float, nargs="+", required=True, help="values of --learning_rate")
    parser.add_argument("--max_train_steps", type=int, default=200, help="steps per run")
    parser.add_argument("--num_validation_pairs", type=int, default=128, help="held-out pairs (the trainer's flag)")
    parser.add_argument("--evaluations", type=int, default=4, help="held-out evaluations per run after the first")
    parser.add_argument("--collapse_threshold", type=float, default=1.5, help="the trainer's flag")
    parser.add_argument("--output_dir", default="dpo-sweep")
    parser.add_argument("--launcher", choices=["accelerate", "python"], default="accelerate", help="how runs start")
    parser.add_argument("--launch_args", default="", help='options of accelerate launch, e.g. "--num_processes 8"')
    parser.add_argument("--demo", action="store_true", help="the offline demo's model and data (built if missing)")
    args = parser.parse_args(own)
    if min(args.betas + args.learning_rates) <= 0 or args.collapse_threshold <= 1:
        parser.error("--betas and --learning_rates must be above 0, --collapse_threshold above 1")
    if min(args.max_train_steps, args.evaluations, args.num_validation_pairs) < 1:
        parser.error("--max_train_steps, --evaluations and --num_validation_pairs must be at least 1")
    args.trainer_flags = trainer_flags
    return args


def demo_flags(output_dir):
    """The trainer flags of examples/alignment_demo.py's runs, on its dataset (written under output_dir once)."""
    import quiet_notices  # noqa: F401  (before tiny_assets' libraries: their notices mean nothing here)
    import tiny_assets

    data = Path(output_dir) / "pairs-512"
    if not data.exists():
        tiny_assets.build_pickapic_dataset(str(data), n_pairs=512, n_ties=0, seed=1234)
    return [*DEMO_FLAGS, "--dataset_name", str(data)]


def held_out_evaluations(run_dir):
    """{step: {name: value}} of the run's held-out evaluations, from its tensorboard logs."""
    folder = Path(run_dir) / "logs" / "sweep"
    if not folder.exists():
        return {}
    events = EventAccumulator(str(folder)).Reload()
    evaluations = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag) if tag.startswith("eval/") else []:
            evaluations.setdefault(event.step, {})[tag] = event.value
    return evaluations


def run_command(args, beta, learning_rate, trainer_flags):
    """The run's name and its command line: the user's trainer flags, then the sweep's (which win)."""
    name = f"beta{beta:g}-lr{learning_rate:g}"
    run_dir = Path(args.output_dir) / name
    flags = [
        *trainer_flags,
        *("--beta_dpo", str(beta), "--learning_rate", str(learning_rate), "--output_dir", str(run_dir)),
        *("--max_train_steps", str(args.max_train_steps), "--num_validation_pairs", str(args.num_validation_pairs)),
        *("--validation_steps", str(max(1, args.max_train_steps // args.evaluations)), "--stop_on_collapse"),
        *("--collapse_threshold", str(args.collapse_threshold)),
        *("--report_to", "tensorboard", "--logging_dir", "logs", "--tracker_name", "sweep"),
    ]
    launcher = [sys.executable]
    if args.launcher == "accelerate":
        launcher += ["-m", "accelerate.commands.launch", *shlex.split(args.launch_args)]
    return name, [*launcher, args.trainer, *flags]


def run_setting(args, beta, learning_rate, name, command):
    """One short training; returns its row: the last held-out evaluation and the first collapse. A failed run
    (a collapse is no failure: the trainer stops it with exit code 0) stops the sweep in one line."""
    run_dir, log_path = Path(args.output_dir) / name, Path(args.output_dir) / f"{name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        exit_code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    evaluations = held_out_evaluations(run_dir)
    ratios = {step: e["eval/winner_ratio"] for step, e in sorted(evaluations.items()) if "eval/winner_ratio" in e}
    collapsed_at = next((step for step, ratio in ratios.items() if ratio > args.collapse_threshold), None)
    if exit_code != 0:
        last_line = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
        sys.exit(f"error: the run {name} failed (exit code {exit_code}): {last_line[-300:]} (all of it: {log_path})")
    last_step = max(evaluations, default=None)
    return {
        "run": name,
        "beta": beta,
        "learning_rate": learning_rate,
        "command": command,
        "seconds": round(time.time() - start, 1),
        "steps": last_step,
        "collapsed_at": collapsed_at,
        "health": "healthy" if collapsed_at is None else f"collapsed at step {collapsed_at}",
        "metrics": evaluations.get(last_step, {}),
        "winner_ratios": ratios,
    }


def table(results):
    lines = [
        "| β | learning rate | steps | " + " | ".join(COLUMNS.values()) + " | health |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    for r in results:
        values = [f"{r['metrics'][name]:.3f}" if name in r["metrics"] else "-" for name in COLUMNS]
        lines.append(
            f"| {r['beta']:g} | {r['learning_rate']:g} | {r['steps']} | " + " | ".join(values) + f" | {r['health']} |"
        )
    return "\n".join(lines)


def best_healthy(results):
    healthy = [r for r in results if r["health"] == "healthy" and "eval/implicit_acc" in r["metrics"]]
    return max(
        healthy,
        key=lambda r: (round(r["metrics"]["eval/implicit_acc"], 3), -r["metrics"]["eval/winner_ratio"]),
        default=None,
    )


def main(args):
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer_flags = (demo_flags(output_dir) if args.demo else []) + args.trainer_flags
    results_path = output_dir / "sweep_results.json"
    earlier = {r["run"]: r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    grid = [(beta, learning_rate) for beta in args.betas for learning_rate in args.learning_rates]
    results = []
    for number, (beta, learning_rate) in enumerate(grid, start=1):
        name, command = run_command(args, beta, learning_rate, trainer_flags)
        reused = earlier.get(name, {}).get("command") == command
        print(f"[{number}/{len(grid)}] beta {beta:g}, learning rate {learning_rate:g}: ", end="", flush=True)
        if not reused:
            print(f"training {args.max_train_steps} steps (output: {output_dir / name}.log)", flush=True)
        result = earlier[name] if reused else run_setting(args, beta, learning_rate, name, command)
        results.append(result)
        earlier[name] = result
        results_path.write_text(json.dumps(list(earlier.values()), indent=2))
        took = "from an earlier sweep" if reused else f"{result['seconds']} s"
        metrics = result["metrics"]
        accuracy, ratio = metrics.get("eval/implicit_acc", math.nan), metrics.get("eval/winner_ratio", math.nan)
        print(
            f"{'' if reused else '  '}{result['health']}; at step {result['steps']}: held-out accuracy "
            f"{accuracy:.3f}, winner ratio {ratio:.3f} ({took})",
            flush=True,
        )
    print("\n" + table(results) + "\n")
    best = best_healthy(results)
    if best is None:
        print("No healthy setting: every run collapsed; try larger betas or smaller learning rates.")
    else:
        metrics = best["metrics"]
        print(
            f"Best healthy setting: --beta_dpo {best['beta']:g} --learning_rate {best['learning_rate']:g} (held-out "
            f"accuracy {metrics['eval/implicit_acc']:.3f}, winner ratio {metrics['eval/winner_ratio']:.3f})"
        )
    return results


if __name__ == "__main__":
    main(parse_args())
