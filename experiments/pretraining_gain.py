"""Does MAE pretraining help? The same fine-tuning budget from MAE and from random weights.

Given a pretraining workdir (configs/mae_pretrain.py), each part below trains twice
with configs that differ ONLY in `model_init` (the MAE workdir, or empty for a
random initialisation): same data stream, seed, steps, batch, optimiser,
learning rates and layer-wise decay. Every run is then evaluated on its held-out
split with its best checkpoint (chosen on the separate selection split), and a
table compares them:

  finetune       mae_classify.py, mode=finetune: held-out macro ROC-AUC, accuracy
  linear_probe   mae_classify.py, mode=linear_probe: the same (random init: a probe
                 of random features, the floor of what the head alone can do)
  superres       mae_superres.py: held-out PSNR (and SSIM), beside bicubic

Workdirs are OUT/<part>_<init>; a rerun resumes finished or interrupted runs from
their checkpoints and re-evaluates. The table goes to stdout and to
OUT/pretraining_gain.json and OUT/pretraining_gain.md. The defaults (encoder
"tiny", a few hundred to a thousand steps) take a few minutes per run on a
2-core CPU; use --steps / --encoder S on a GPU.

    # 1. pretrain (CPU size; the MAE's encoder size is passed on with --encoder):
    python -m lensjax.main --config configs/mae_pretrain.py:encoder=tiny,steps=3000 \
        --workdir runs/mae_pretrain_tiny --mode=train_eval
    # 2. compare:
    python experiments/pretraining_gain.py --pretrain runs/mae_pretrain_tiny --encoder tiny \
        --out runs/pretraining_gain
    # a smoke run of the whole chain (2 steps each, on a runlocal pretraining run):
    python -m lensjax.main --config configs/mae_pretrain.py:runlocal=True --workdir /tmp/mae_rl
    python experiments/pretraining_gain.py --pretrain /tmp/mae_rl --runlocal --out /tmp/gain_rl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("finetune", "linear_probe", "superres")
INITS = ("mae", "random")


def load_config(name: str, arg: str):
    """configs/<name>.py get_config(arg)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def part_config(part: str, init: str, args: argparse.Namespace):
    """The config of one run: `part` from `init` ("mae" or "random")."""
    options = ["runlocal=True"] if args.runlocal else [f"encoder={args.encoder}"]
    if init == "mae":
        options.append(f"init={args.pretrain}")
    if part == "superres":
        config = load_config("mae_superres", ",".join(options))
        steps, batch, heldout = args.superres_steps, args.superres_batch, args.superres_heldout
    else:
        config = load_config("mae_classify", ",".join([*options, f"mode={part}"]))
        steps, batch, heldout = args.steps, args.batch, args.heldout
    if not args.runlocal:
        config.train.steps = steps
        config.train.batch_size = batch
        config.train.warmup_steps = max(1, steps // 20)
        config.train.eval_every = config.train.checkpoint_every = max(1, steps // 4)
        config.train.log_every = max(1, steps // 20)
        config.data.heldout_examples = heldout
        config.data.selection_examples = max(64, heldout // 4)
        config.eval.batch_size = 64 if part == "superres" else 200
    return config


def preflight(configs: dict) -> None:
    """Fail before any training if a warm start would be refused (normalisation)."""
    from lensjax import train
    for (part, init), config in configs.items():
        if config.model_init:
            try:
                train.check_same_normalization(config, config.model_init)
            except ValueError as err:
                raise SystemExit(f"{part} from the MAE cannot start: {err}\n(leave the part out "
                                 f"with --parts)") from None


def headline_numbers(part: str, report: dict) -> dict:
    """The compared numbers of a report, with the held-out sample count."""
    metrics = report["metrics"]
    if part == "superres":
        return {"psnr_db": metrics["lensjax"]["psnr"]["mean"],
                "psnr_sem": metrics["lensjax"]["psnr"]["sem"],
                "ssim": metrics["lensjax"]["ssim"]["mean"],
                "bicubic_psnr_db": metrics["bicubic"]["psnr"]["mean"],
                "num_heldout": metrics["num_images"]}
    return {"auc_macro": metrics["auc_macro"], "auc_micro": metrics["auc_micro"],
            "accuracy": metrics["accuracy"], "num_heldout": metrics["num_samples"]}


def run_one(config, workdir: Path) -> dict:
    from lensjax import evaluate, train
    train.train_and_evaluate(config, workdir)
    return evaluate.evaluate_workdir(workdir)


def pretraining_row(pretrain: str, out: Path) -> dict:
    """The pretraining run's held-out masked-patch MSE: its report if it has one, else a
    fresh evaluation written to OUT/pretrain_report."""
    from lensjax import evaluate
    path = Path(pretrain) / "report" / "report.json"
    report = (json.loads(path.read_text()) if path.is_file()
              else evaluate.evaluate_workdir(pretrain, out / "pretrain_report"))
    config = evaluate.load_config(pretrain)
    metrics = report["metrics"]
    return {"part": "mae_pretrain", "init": "-", "workdir": str(pretrain),
            "steps": int(config.train.steps), "batch": int(config.train.batch_size),
            "checkpoint_step": report["checkpoint"]["step"], "headline": report["headline"],
            "numbers": {"masked_mse": metrics["masked_mse"]["mean"],
                        "mean_fill_mse": metrics["mean_fill_mse"]["mean"],
                        "num_heldout": metrics["num_images"]}}


def format_table(rows: list[dict]) -> str:
    """Markdown table of the compared numbers."""
    lines = ["| part | init | steps x batch | held-out N | masked MSE (mean-fill) | macro AUC | "
             "accuracy | PSNR [dB] | SSIM | bicubic PSNR [dB] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        n = row["numbers"]

        def cell(key, fmt):
            return format(n[key], fmt) if key in n else ""

        masked = (f"{n['masked_mse']:.4g} ({n['mean_fill_mse']:.4g})" if "masked_mse" in n else "")
        psnr = f"{n['psnr_db']:.2f} +- {n['psnr_sem']:.2f}" if "psnr_db" in n else ""
        lines.append(f"| {row['part']} | {row['init']} | {row['steps']} x {row['batch']} | "
                     f"{n['num_heldout']} | {masked} | {cell('auc_macro', '.4f')} | "
                     f"{cell('accuracy', '.4f')} | {psnr} | {cell('ssim', '.4f')} | "
                     f"{cell('bicubic_psnr_db', '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", required=True, help="workdir of configs/mae_pretrain.py")
    parser.add_argument("--out", default="runs/pretraining_gain")
    parser.add_argument("--encoder", default="tiny",
                        help="encoder size of the pretraining run (lensjax.configlib.MAE_ENCODERS)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--steps", type=int, default=1000, help="classification steps")
    parser.add_argument("--batch", type=int, default=64, help="classification batch")
    parser.add_argument("--heldout", type=int, default=1500, help="classification held-out images")
    parser.add_argument("--superres-steps", type=int, default=500)
    parser.add_argument("--superres-batch", type=int, default=32)
    parser.add_argument("--superres-heldout", type=int, default=320)
    parser.add_argument("--runlocal", action="store_true",
                        help="2 steps per run on the runlocal configs (a smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    jax.config.update("jax_threefry_partitionable", True)  # as lensjax.main: same streams
    from lensjax import checkpointing
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
    checkpointing.find_checkpoint(args.pretrain, prefer_best=True)  # fails with the command
    configs = {(part, init): part_config(part, init, args) for part in parts for init in INITS}
    preflight(configs)

    out = Path(args.out)
    rows = [pretraining_row(args.pretrain, out)]
    print(f"== MAE pretraining {args.pretrain}: {rows[0]['headline']}", flush=True)
    for (part, init), config in configs.items():
        workdir = out / f"{part}_{init}"
        print(f"== {part} from {init} init: {workdir}", flush=True)
        report = run_one(config, workdir)
        rows.append({"part": part, "init": init, "workdir": str(workdir),
                     "steps": int(config.train.steps), "batch": int(config.train.batch_size),
                     "checkpoint_step": report["checkpoint"]["step"],
                     "numbers": headline_numbers(part, report), "headline": report["headline"]})
        print(f"   {report['headline']}", flush=True)
    table = format_table(rows)
    summary = {"pretrain": str(args.pretrain),
               "encoder": "runlocal" if args.runlocal else args.encoder,
               "same budget": "each pair differs only in model_init", "runs": rows}
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretraining_gain.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "pretraining_gain.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
