"""The classifier's command lines: :func:`train_main` runs ``examples/train_nsynth.py``, :func:`predict_main`
``examples/predict.py``; their usage texts below are what ``--help`` prints."""
import argparse
import dataclasses
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

import rnn_fast

from .atomic import write_json
from .data import CLASSES, FRAME_SIZE, SOURCES, SPLITS, BatchLoader, ensure_builtin_dataset, load_split, prepare
from .models import MODEL_NAMES, build_model
from .plots import write_figures, write_report
from .predict import Failure, expand_inputs, format_table, one_line, predict_batches
from .recipes import RECIPES, Recipe
from .training.checkpoint import load_checkpoint, load_classifier, restore_checkpoint
from .training.distributed import Distributed, all_gather_objects, distributed_session, wrap_model
from .training.engine import PRECISIONS, FitSettings, evaluate, fit
from .training.metrics import metrics_summary
from .training.rng import seed_everything
from .training.state import Learner, TrainingState

TRAIN_USAGE = """Train an NSynth instrument-family classifier (LSTM, BLSTM or the M5 raw-waveform CNN) with rnn_fast.

The model reads the first second of each note (16 kHz) as 100 frames of 160 samples and predicts one of 10
instrument families (synth_lead has no valid/test examples and is dropped).

  python examples/train_nsynth.py
      No arguments: a quick demonstration. Generates a small synthetic NSynth-layout data set once (cached in
      $RNN_FAST_DATA_DIR, default ~/.cache/rnn_fast), trains the LSTM for a few epochs on CPU and writes
      runs/nsynth-lstm/. About 2 minutes on 2 cores.

  python examples/train_nsynth.py --data-dir /path/to/nsynth --epochs 30 --batch-size 768
      The seed recipe (2-layer LSTM, hidden 128, Adam lr 0.003, cross-entropy) on the real data set, whose
      directory holds nsynth-{train,valid,test}/ from the official jsonwav tarballs (docs/nsynth.md). Add
      --model blstm or --model cnn for the other two models of the report.

  python examples/train_nsynth.py --data-dir /path/to/nsynth --recipe robust --epochs 30 --batch-size 128
      The same 2-layer LSTM in a recipe that generalises to unseen instruments: a log-mel front end computed on
      the fly, a head on the mean and maximum of the outputs over the steps, a cosine schedule and the epoch of
      best validation accuracy (rnn_fast/nsynth/recipes.py). Each piece, and each piece it leaves off (augmentation,
      mixup, regularisation), has a flag (the "recipe" group below).

  torchrun --nproc_per_node=2 examples/train_nsynth.py ...
      DistributedDataParallel (gloo on CPU, NCCL on CUDA); --batch-size stays the global batch.

Outputs in --out: metrics.json, the figures (*.png), report.md and checkpoint.pt (rewritten atomically after
every epoch; --resume continues from it).
"""
PREDICT_USAGE = """Instrument-family probabilities of audio files from a checkpoint of examples/train_nsynth.py.

  python examples/predict.py --checkpoint runs/nsynth-lstm/checkpoint.pt note.wav
  python examples/predict.py --checkpoint runs/nsynth-lstm/checkpoint.pt violin-44.1kHz-stereo.wav recordings/ --top 3
  python examples/predict.py --checkpoint runs/nsynth-lstm/checkpoint.pt 'samples/**/*.flac' --json > out.jsonl

Files: WAV (any PCM width or float), FLAC, OGG and the other formats libsndfile reads, at any sample rate and with
any number of channels: the channels are averaged to mono and the audio is resampled to 16 kHz (soxr). The model
reads the first second; a shorter file is padded with silence and flagged, by a warning on stderr and a note in its
row. A directory stands for the audio files below it (.wav .wave .flac .ogg .oga .aif .aiff .mp3), a quoted glob
pattern for its matches. Files go through the model --batch-size at a time, with a progress bar on stderr when
there is more than one batch.

Output: a table with a row per file (the predicted family and every family's probability, or the --top K most
probable), or with --json one JSON object per line and file: {"path", "prediction", "probabilities": {family: p},
"seconds" (the file's length), "warning" (null or why to doubt the prediction)}.

Errors: a file or argument that gives no prediction is one line on stderr, "error: FILE: reason", and the other
files are still predicted. Exit status: 0 when every file was predicted, 1 when any was not or the checkpoint could
not be loaded, 2 for a usage error. --debug adds the tracebacks.
"""
TRAIN_SCRIPT = "examples/train_nsynth.py"  # the command report.md says ran

CHECKPOINT = "checkpoint.pt"
# Settings a resumed run must share with the checkpoint it continues (--epochs may grow, unless the learning
# rate schedule spans the run).
RESUME_KEYS = ("model_config", "classes", "recipe", "batch_size", "seed")

QUICK_EPOCHS = 6
QUICK_BATCH_SIZE = 64


def _parser(usage: str) -> argparse.ArgumentParser:
    description, epilog = usage.split("\n\n", 1)
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------------------------ training
def parse_train_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = _parser(TRAIN_USAGE)
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
    train.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: forwards under torch.autocast to bfloat16, fp32 master weights (default fp32)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    train.add_argument("--out", type=Path, help="run directory (default: runs/nsynth-MODEL)")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    existing.add_argument("--overwrite", action="store_true", help="start again, replacing OUT/checkpoint.pt")
    train.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    recipe = parser.add_argument_group("recipe", "--recipe sets all of these; a flag given overrides its value "
                                                 "(each says the seed recipe's)")
    recipe.add_argument("--recipe", choices=tuple(RECIPES), default="seed",
                        help="seed: the course report's; robust: generalises to unseen instruments")
    add_recipe_flags(recipe)
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs") / f"nsynth-{args.model}"
    return args


def add_recipe_flags(group) -> None:
    """A flag for every field of :class:`Recipe` but its name (``--recipe`` picks that), declared as the field's
    metadata says. A flag not given is None, which leaves the chosen recipe's value (``Recipe.replace``)."""
    for field in dataclasses.fields(Recipe):
        if field.name == "name":
            continue
        options = {**field.metadata, "help": f"{field.metadata['help']} (seed: {_flag_value(field.default)})"}
        if field.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.setdefault("type", field.type)
        group.add_argument("--" + field.name.replace("_", "-"), **options)


def _flag_value(value) -> str:
    """How a recipe value reads on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "off"
    return str(value)


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    """``--recipe`` with every recipe flag given on the command line applied over it."""
    fields = {field.name for field in dataclasses.fields(Recipe)} - {"name"}
    recipe = RECIPES[args.recipe].replace(**{name: value for name, value in vars(args).items() if name in fields})
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
            cache_dir = ensure_builtin_dataset(progress=progress)
        else:
            cache_dir = prepare(args.data_dir, args.cache_dir or args.data_dir / "rnn_fast_cache",
                                workers=args.workers, progress=progress)
    return all_gather_objects(cache_dir, ctx)[0]


def run_config(args: argparse.Namespace, recipe: Recipe) -> dict:
    """Stored in every checkpoint: ``build_model(**model_config)`` rebuilds the network (predict.py does)."""
    model_config = {"name": args.model, "num_classes": len(CLASSES), "input_size": FRAME_SIZE,
                    "hidden_size": args.hidden, "num_layers": args.layers, "cnn_width": args.cnn_width,
                    **recipe.model_options()}
    return {"model_config": model_config, "classes": list(CLASSES), "recipe": recipe.as_dict(),
            "batch_size": args.batch_size, "seed": args.seed, "epochs": args.epochs}


def resume_state(args: argparse.Namespace, config: dict, learner: Learner, ctx: Distributed) -> TrainingState:
    path = args.out / CHECKPOINT
    if not path.exists() or args.overwrite:
        if args.resume and ctx.is_main:
            print(f"--resume: no {path} yet, starting from scratch")
        return TrainingState()
    if not args.resume:
        raise SystemExit(f"{path} exists: pass --resume to continue that run, --overwrite to start it again, "
                         "or choose another --out")
    checkpoint = load_checkpoint(path)
    keys = RESUME_KEYS + (("epochs",) if learner.scheduler is not None else ())
    different = {key: (checkpoint["config"].get(key), config[key]) for key in keys
                 if checkpoint["config"].get(key) != config[key]}
    if different:
        raise SystemExit(f"{path} was trained with other settings (checkpoint, now): {different}")
    state = restore_checkpoint(checkpoint, learner, ctx)
    if ctx.is_main:
        print(f"resumed {path} after epoch {state.epoch}")
    return state


def train_main(argv: Optional[List[str]] = None) -> Optional[dict]:
    """Trains, tests and writes the run directory; returns metrics.json's content on rank 0 (None elsewhere)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_train_args(argv)
    with distributed_session(requested_device(args).type) as ctx:
        return _train(args, argv, ctx)


def _train(args: argparse.Namespace, argv: List[str], ctx: Distributed) -> Optional[dict]:
    device = process_device(args, ctx)
    if args.batch_size % ctx.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {ctx.world_size} processes")
    cache_dir = prepare_data(args, ctx)
    splits = {name: load_split(cache_dir, name) for name in SPLITS}

    recipe = resolve_recipe(args)
    config = run_config(args, recipe)
    seed_everything(args.seed)
    model = build_model(**config["model_config"], backend=args.backend).to(device)
    optimizer = recipe.optimizer(model.parameters())
    loader = BatchLoader(splits["train"], args.batch_size // ctx.world_size, shuffle=True, drop_last=True,
                         seed=args.seed, device=device, on_device=device.type == "cuda", rank=ctx.rank,
                         world_size=ctx.world_size)
    learner = Learner(model, optimizer, recipe.objective(splits["train"].labels, len(CLASSES)),
                      recipe.scheduler(optimizer, args.epochs, len(loader)), recipe.weight_average(model),
                      args.precision)
    state = resume_state(args, config, learner, ctx)
    if state.epoch == 0 and ctx.rank:
        # dropout masks and augmentation differ between ranks; weights come from rank 0
        seed_everything(args.seed + ctx.rank)
    learner = dataclasses.replace(learner, model=wrap_model(model, ctx, device))
    if ctx.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model}, {recipe.name} recipe: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"backend {rnn_fast.model_backend(model)}, {device}, {ctx.world_size} process(es); train/valid/test = "
              f"{len(splits['train'])}/{len(splits['valid'])}/{len(splits['test'])}; {len(loader)} steps/epoch")

    settings = FitSettings(args.epochs, device, args.out / CHECKPOINT, config, args.eval_batch_size, args.log_every,
                           not args.no_progress, recipe.select_best, recipe.patience)
    fit(learner, loader, splits["valid"], state, settings, ctx)
    test = splits["test"]
    evaluation = evaluate(learner.model, test.audio, test.labels, args.eval_batch_size, device, ctx, args.precision)
    if not ctx.is_main:
        return None

    metrics = metrics_summary(args.model, rnn_fast.model_backend(model), evaluation, CLASSES,
                              {name: len(split) for name, split in splits.items()}, state.history,
                              recipe.as_dict(), state.best_epoch or None)
    metrics["precision"] = args.precision
    write_json(args.out / "metrics.json", metrics)
    figures = write_figures(args.out, metrics, test.audio, test.labels, test.sources, evaluation.probabilities,
                            SOURCES)
    launcher = ["torchrun", f"--nproc_per_node={ctx.world_size}"] if ctx.enabled else ["python"]
    write_report(args.out, metrics, figures, shlex.join([*launcher, TRAIN_SCRIPT, *argv]))
    print(f"test accuracy {100 * evaluation.accuracy:.2f}% ({len(test)} examples); wrote {args.out}/")
    return metrics


# ------------------------------------------------------------------------------------------------ prediction
def predict_parser() -> argparse.ArgumentParser:
    parser = _parser(PREDICT_USAGE)
    parser.add_argument("inputs", nargs="+", metavar="FILE|DIR|GLOB",
                        help="audio files, directories to search for them, or quoted glob patterns")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/nsynth-lstm/checkpoint.pt"),
                        help="checkpoint.pt of a run of examples/train_nsynth.py (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line and file instead of a table")
    parser.add_argument("--top", type=_positive_int, metavar="K",
                        help="only the K most probable families, most probable first (default: every family)")
    parser.add_argument("--batch-size", type=_positive_int, default=256,
                        help="files read and run through the model at a time (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--backend", choices=rnn_fast.BACKENDS, default="auto", help="rnn_fast.LSTM backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def predict_main(argv: Optional[List[str]] = None) -> int:
    """Prints the prediction of every file that the command line names; returns the exit status (0 when every
    file was predicted, else 1)."""
    args = predict_parser().parse_args(argv)
    try:
        return _predict(args)
    except Exception as exc:  # a line a person can act on; --debug keeps the traceback
        if args.debug:
            raise
        message = str(exc) if isinstance(exc, CheckpointError) else f"{one_line(exc)} (--debug shows the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 1


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message says all there is to say."""


def _predict(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    try:
        model, classes = load_classifier(args.checkpoint, device, args.backend)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise CheckpointError(f"{args.checkpoint}: cannot load the checkpoint ({reason})") from exc
    except Exception as exc:  # torch.load's and our own, about a file that is no checkpoint of ours
        reason = f"not a checkpoint of examples/train_nsynth.py ({one_line(exc)})"
        raise CheckpointError(f"{args.checkpoint}: {reason}") from exc
    paths, failures = expand_inputs(args.inputs)
    for failure in failures:
        _report(failure, args.debug)
    predictions = []
    with tqdm(total=len(paths), unit="file", file=sys.stderr, dynamic_ncols=True,
              disable=args.no_progress or len(paths) <= args.batch_size) as bar:
        for outcomes in predict_batches(model, classes, paths, device, args.batch_size):
            for outcome in outcomes:
                if isinstance(outcome, Failure):
                    failures.append(outcome)
                    _report(outcome, args.debug)
                else:
                    predictions.append(outcome)
                    if outcome.warning:
                        tqdm.write(f"warning: {outcome.path}: {outcome.warning}", file=sys.stderr)
            bar.update(len(outcomes))
    if predictions:
        print("\n".join(json.dumps(prediction.record(args.top)) for prediction in predictions) if args.json
              else format_table(predictions, args.top))
    return 1 if failures else 0


def _report(failure: Failure, debug: bool) -> None:
    tqdm.write(f"error: {failure.path}: {failure.reason}", file=sys.stderr)
    if debug and failure.error is not None:
        traceback.print_exception(type(failure.error), failure.error, failure.error.__traceback__)
