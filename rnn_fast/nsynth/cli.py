"""Train an NSynth instrument-family classifier (LSTM, BLSTM or the M5 raw-waveform CNN) with rnn_fast.

The model reads the first second of each note (16 kHz) as 100 frames of 160 samples and predicts one of 10
instrument families (synth_lead has no valid/test examples and is dropped).

  python examples/train_nsynth.py
      No arguments: a quick demonstration. Generates a small synthetic NSynth-layout data set once (cached in
      $RNN_FAST_DATA_DIR, default ~/.cache/rnn_fast), trains the LSTM for a few epochs on CPU and writes
      runs/nsynth-lstm/. About 2 minutes on 2 cores.

  python examples/train_nsynth.py --data-dir /path/to/nsynth --epochs 30 --batch-size 768
      The seed recipe (2-layer LSTM, hidden 128, Adam lr 0.003, cross-entropy) on the real data set, whose
      directory holds nsynth-{train,valid,test}/ from the official jsonwav tarballs (docs/nsynth.md). Add --model blstm or
      --model cnn for the other two models of the report.

  python examples/train_nsynth.py --data-dir /path/to/nsynth --recipe robust --epochs 30 --batch-size 128
      The same 2-layer LSTM in a recipe that generalises to unseen instruments: a log-mel front end computed on
      the fly, a head on the mean and maximum of the outputs over the steps, a cosine schedule and the epoch of
      best validation accuracy (rnn_fast/recipes.py). Each piece, and each piece it leaves off (augmentation,
      mixup, regularisation), has a flag (the "recipe" group below).

  torchrun --nproc_per_node=2 examples/train_nsynth.py ...
      DistributedDataParallel (gloo on CPU, NCCL on CUDA); --batch-size stays the global batch.

Outputs in --out: metrics.json, the figures (*.png), report.md and checkpoint.pt (rewritten atomically after
every epoch; --resume continues from it).
"""
import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import torch

import rnn_fast
from rnn_fast.nsynth import data as nsynth
from rnn_fast.nsynth.atomic import write_json
from rnn_fast.nsynth.audio import FRONT_ENDS
from rnn_fast.nsynth.models import MODEL_NAMES, POOLINGS, build_model
from rnn_fast.nsynth.plots import write_figures, write_report
from rnn_fast.nsynth.recipes import RECIPES, SCHEDULES, Recipe
from rnn_fast.nsynth.training.engine import (Distributed, TrainingState, all_gather_objects, distributed_session,
                               evaluate, fit, load_checkpoint, metrics_summary, restore_checkpoint, seed_everything,
                               wrap_model)

CHECKPOINT = "checkpoint.pt"
# Settings a resumed run must share with the checkpoint it continues (--epochs may grow, unless the learning
# rate schedule spans the run).
RESUME_KEYS = ("model_config", "classes", "recipe", "batch_size", "seed")

QUICK_EPOCHS = 6
QUICK_BATCH_SIZE = 64


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path,
                      help="NSynth root holding nsynth-{train,valid,test}/ (jsonwav); default: the built-in "
                           "synthetic set, generated once into $RNN_FAST_DATA_DIR (default ~/.cache/rnn_fast)")
    data.add_argument("--cache-dir", type=Path,
                      help="prepared cache of --data-dir (first second of every note as int16); "
                           "default: DATA_DIR/rnn_fast_cache")
    data.add_argument("--workers", type=int, help="processes reading WAVs while preparing the cache (default: CPUs)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODEL_NAMES, default="lstm")
    model.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (default 128)")
    model.add_argument("--layers", type=int, default=2, help="LSTM layers (default 2)")
    model.add_argument("--cnn-width", type=int, default=128, help="channels of the CNN's first block (M5: 128)")
    model.add_argument("--backend", choices=rnn_fast.BACKENDS, default="auto", help="rnn_fast.LSTM backend")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=QUICK_EPOCHS,
                       help=f"default {QUICK_EPOCHS} (quick demonstration); seed recipe: 30")
    train.add_argument("--batch-size", type=int, default=QUICK_BATCH_SIZE,
                       help=f"global batch, split evenly over torchrun processes; default {QUICK_BATCH_SIZE} "
                            "(quick demonstration); seed recipe: 768")
    train.add_argument("--eval-batch-size", type=int, default=512, help="examples per validation/test batch")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/nsynth-MODEL)")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    existing.add_argument("--overwrite", action="store_true", help="start again, replacing OUT/checkpoint.pt")
    train.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    recipe = parser.add_argument_group("recipe", "--recipe sets all of these; a flag given overrides its value "
                                                 "(defaults below are the seed recipe's)")
    recipe.add_argument("--recipe", choices=tuple(RECIPES), default="seed",
                        help="seed: the course report's; robust: generalises to unseen instruments")
    recipe.add_argument("--front-end", choices=FRONT_ENDS, help="LSTM input: raw 160-sample frames or log-mel")
    recipe.add_argument("--n-mels", type=int, help="mel bands of the log-mel front end (robust: 64)")
    recipe.add_argument("--loudness", action=argparse.BooleanOptionalAction,
                        help="scale every example's first second to unit RMS")
    recipe.add_argument("--max-delay", type=float, metavar="SECONDS", help="random onset delay in training")
    recipe.add_argument("--noise-snr", type=_noise_snr, metavar="LOW,HIGH|off",
                        help="white noise at a random SNR (dB) on half the training examples")
    recipe.add_argument("--reverb", type=float, metavar="SECONDS",
                        help="training only: a random room with a reverberation time of up to SECONDS on half the "
                             "examples")
    recipe.add_argument("--freq-masks", type=int, help="SpecAugment frequency masks (up to 8 bands each)")
    recipe.add_argument("--time-masks", type=int, help="SpecAugment time masks (up to 10 frames each)")
    recipe.add_argument("--freq-shift", type=int, metavar="BANDS",
                        help="shift the features by a random number of bands up to this (training only)")
    recipe.add_argument("--eq-db", type=float, metavar="DB",
                        help="log-mel only: random smooth equalisation of up to DB dB per training example")
    recipe.add_argument("--pooling", choices=POOLINGS, help="the head reads the LSTM's last step, or its mean over "
                                                            "the steps, with the maximum (and standard deviation)")
    recipe.add_argument("--dropout", type=float, help="dropout between LSTM layers and before the head")
    recipe.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA); 0 = off")
    recipe.add_argument("--mixup-within-family", action=argparse.BooleanOptionalAction,
                        help="with --mixup: mix each note with another of its own family, keeping its label")
    recipe.add_argument("--class-balanced", action=argparse.BooleanOptionalAction,
                        help="weight the loss by inverse training class frequency")
    recipe.add_argument("--label-smoothing", type=float, metavar="EPS",
                        help="cross-entropy against targets with EPS spread evenly over the classes")
    recipe.add_argument("--lr", type=float, help="Adam learning rate (seed: 0.003)")
    recipe.add_argument("--weight-decay", type=float, help="decoupled (AdamW) weight decay")
    recipe.add_argument("--schedule", choices=SCHEDULES, help="learning rate schedule")
    recipe.add_argument("--ema", type=float, metavar="DECAY",
                        help="validate, select and serve an exponential moving average of the weights "
                             "(per-step decay; 0 = off)")
    recipe.add_argument("--select-best", action=argparse.BooleanOptionalAction,
                        help="test the epoch with the best validation accuracy instead of the last")
    recipe.add_argument("--patience", type=int, help="with --select-best: stop after this many epochs without "
                                                     "a better validation accuracy; 0 = never")
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs") / f"nsynth-{args.model}"
    return args


def _noise_snr(text: str) -> tuple:
    if text == "off":
        return ()
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in dB or off, got {text!r}") from None
    return low, high


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    """``--recipe`` with every recipe flag given on the command line applied over it."""
    fields = Recipe.__dataclass_fields__
    recipe = RECIPES[args.recipe].replace(**{name: value for name, value in vars(args).items()
                                             if name in fields and name != "name"})
    if args.model == "cnn" and (recipe.front_end_config() is not None or recipe.pooling != "last"):
        raise SystemExit(f"--model cnn reads the raw waveform; the {recipe.name} recipe's front end and pooling "
                         "are for the LSTM models (--front-end frames --no-loudness --max-delay 0 --noise-snr off "
                         "--reverb 0 --freq-masks 0 --time-masks 0 --freq-shift 0 --eq-db 0 --pooling last turns "
                         "them off)")
    return recipe


def requested_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def process_device(args: argparse.Namespace, ctx: Distributed) -> torch.device:
    """The requested device; under torchrun on CUDA, this process's GPU (``LOCAL_RANK``)."""
    device = requested_device(args)
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.enabled else device


def prepare_data(args: argparse.Namespace, ctx: Distributed) -> Path:
    """Rank 0 builds the cache (and, without --data-dir, the synthetic set) while the other ranks wait for
    its path."""
    cache_dir = None
    if ctx.is_main:
        progress = not args.no_progress
        if args.data_dir is None:
            cache_dir = nsynth.ensure_builtin_dataset(progress=progress)
        else:
            cache_dir = nsynth.prepare(args.data_dir, args.cache_dir or args.data_dir / "rnn_fast_cache",
                                       workers=args.workers, progress=progress)
    return all_gather_objects(cache_dir, ctx)[0]


def run_config(args: argparse.Namespace, recipe: Recipe) -> dict:
    """Stored in every checkpoint: ``build_model(**model_config)`` rebuilds the network (predict.py does)."""
    model_config = {"name": args.model, "num_classes": len(nsynth.CLASSES), "input_size": nsynth.FRAME_SIZE,
                    "hidden_size": args.hidden, "num_layers": args.layers, "cnn_width": args.cnn_width,
                    **recipe.model_options()}
    return {"model_config": model_config, "classes": list(nsynth.CLASSES), "recipe": recipe.as_dict(),
            "batch_size": args.batch_size, "seed": args.seed, "epochs": args.epochs}


def resume_state(args, config, model, optimizer, scheduler, average, ctx: Distributed) -> TrainingState:
    path = args.out / CHECKPOINT
    if not path.exists() or args.overwrite:
        if args.resume and ctx.is_main:
            print(f"--resume: no {path} yet, starting from scratch")
        return TrainingState()
    if not args.resume:
        raise SystemExit(f"{path} exists: pass --resume to continue that run, --overwrite to start it again, "
                         "or choose another --out")
    checkpoint = load_checkpoint(path)
    keys = RESUME_KEYS + (("epochs",) if scheduler is not None else ())
    different = {key: (checkpoint["config"].get(key), config[key]) for key in keys
                 if checkpoint["config"].get(key) != config[key]}
    if different:
        raise SystemExit(f"{path} was trained with other settings (checkpoint, now): {different}")
    state = restore_checkpoint(checkpoint, model, optimizer, ctx, scheduler, average)
    if ctx.is_main:
        print(f"resumed {path} after epoch {state.epoch}")
    return state


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    """Trains, tests and writes the run directory; returns metrics.json's content on rank 0 (None elsewhere)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    with distributed_session(requested_device(args).type) as ctx:
        return _train(args, argv, ctx)


def _train(args: argparse.Namespace, argv: List[str], ctx: Distributed) -> Optional[dict]:
    device = process_device(args, ctx)
    if args.batch_size % ctx.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {ctx.world_size} processes")
    cache_dir = prepare_data(args, ctx)
    splits = {name: nsynth.load_split(cache_dir, name) for name in nsynth.SPLITS}

    recipe = resolve_recipe(args)
    config = run_config(args, recipe)
    seed_everything(args.seed)
    model = build_model(**config["model_config"], backend=args.backend).to(device)
    optimizer = recipe.optimizer(model.parameters())
    loader = nsynth.BatchLoader(splits["train"], args.batch_size // ctx.world_size, shuffle=True, drop_last=True,
                                seed=args.seed, device=device, on_device=device.type == "cuda", rank=ctx.rank,
                                world_size=ctx.world_size)
    scheduler = recipe.scheduler(optimizer, args.epochs, len(loader))
    average = recipe.weight_average(model)
    state = resume_state(args, config, model, optimizer, scheduler, average, ctx)
    if state.epoch == 0 and ctx.rank:
        # dropout masks and augmentation differ between ranks; weights come from rank 0
        seed_everything(args.seed + ctx.rank)
    model = wrap_model(model, ctx, device)
    if ctx.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model}, {recipe.name} recipe: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"backend {rnn_fast.model_backend(model)}, {device}, {ctx.world_size} process(es); train/valid/test = "
              f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}; {len(loader)} steps/epoch")

    valid = splits["valid"]
    fit(model, optimizer, loader, valid.audio, valid.labels, args.epochs, state, args.out / CHECKPOINT, config,
        device, ctx, args.eval_batch_size, args.log_every, progress=not args.no_progress,
        objective=recipe.objective(splits["train"].labels, len(nsynth.CLASSES)), scheduler=scheduler,
        select_best=recipe.select_best, patience=recipe.patience, average=average)
    test = splits["test"]
    evaluation = evaluate(model, test.audio, test.labels, args.eval_batch_size, device, ctx)
    if not ctx.is_main:
        return None

    metrics = metrics_summary(args.model, rnn_fast.model_backend(model), evaluation, nsynth.CLASSES,
                              {name: len(split) for name, split in splits.items()}, state.history,
                              recipe.as_dict(), state.best_epoch or None)
    write_json(args.out / "metrics.json", metrics)
    figures = write_figures(args.out, metrics, test.audio, test.labels, test.sources, evaluation.probabilities,
                            nsynth.SOURCES)
    launcher = ["torchrun", f"--nproc_per_node={ctx.world_size}"] if ctx.enabled else ["python"]
    write_report(args.out, metrics, figures, shlex.join([*launcher, "examples/train_nsynth.py", *argv]))
    print(f"test accuracy {100 * evaluation.accuracy:.2f}% ({len(test)} examples); wrote {args.out}/")
    return metrics


if __name__ == "__main__":
    main()
