"""The `cxr-jax` command. Each subcommand parses flags and calls one library
function; nothing here computes anything itself."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error


def _network_cause(error: BaseException) -> BaseException | None:
  """The network error behind `error`, if any: keras.applications re-raises
  a failed download's URLError as a plain Exception, chained to it."""
  while error is not None:
    if isinstance(error, (urllib.error.URLError, ConnectionError,
                          TimeoutError)):
      return error
    error = error.__cause__ or error.__context__
  return None


def _convert_weights(args) -> int:
  from cxr_jax import weights
  options = ({"transform_input": args.torchvision_transform_input}
             if args.model == "inception_v3" and args.source == "torchvision"
             else {})
  try:
    meta = weights.convert(args.model, args.source, args.input, args.output,
                           **options)
  except Exception as e:
    # Only --source keras-imagenet downloads; any other error is the
    # converter's own, already worded for the user or a bug.
    if args.source != "keras-imagenet" or args.input or not _network_cause(e):
      raise
    raise weights.ConversionError(
        f"--source keras-imagenet: downloading InceptionV3's ImageNet "
        f"weights failed ({e}); without internet, fetch the .h5 elsewhere "
        f"and give --source keras --input FILE") from e
  print(f"wrote {args.output}: {json.dumps(meta)}")
  return 0


def _parity_check(args) -> int:
  from cxr_jax import parity
  errors = parity.run(args.model, sizes=tuple(args.sizes), batch=args.batch)
  worst = max(errors.values())
  for name, err in errors.items():
    print(f"{name:32s} max abs error {err:.3e}")
  ok = worst <= args.tolerance
  print(f"{'PASS' if ok else 'FAIL'}: {args.model}, worst max abs error "
        f"{worst:.3e} "
        f"(tolerance {args.tolerance:g})")
  return 0 if ok else 1


def _report(lines, written: str, folder: str) -> int:
  """An analysis command's ending: its table, then what it wrote where."""
  for line in lines:
    print(line)
  print(f"wrote {written} to {folder}")
  return 0


def _synth(args) -> int:
  from cxr_jax.data import synthetic
  summary = synthetic.synthesize(args.out, args.num_images, args.image_size,
                                 args.seed, rgba_fraction=args.rgba_fraction)
  print(f"wrote a synthetic ChestX-ray14 to {args.out}: {json.dumps(summary)}")
  return 0


def _prepare(args) -> int:
  from cxr_jax.data import tfds_builder
  summary = tfds_builder.prepare(args.data_dir, args.out, args.image_size,
                                 allow_missing=args.allow_missing,
                                 workers=args.workers,
                                 png_compression=args.png_compression,
                                 max_pixels=args.max_pixels)
  print(f"prepared {summary['images']} images at {summary['image_size']}px "
        f"in {summary['dir']}")
  if summary["missing_skipped"]:
    print(f"  skipped {summary['missing_skipped']} of {summary['listed']} "
          f"listed images that are not on disk (--allow_missing); the count "
          f"is in the dataset's metadata.json")
  if summary["unlisted_on_disk"]:
    print(f"  {summary['unlisted_on_disk']} images on disk are not in the "
          f"CSV and were not included")
  return 0


def _splits(args) -> int:
  from cxr_jax.data import splits
  summary = splits.run(args.data_dir, args.scheme, args.seed, args.out,
                       view=args.view)
  lines = [f"{name:5s} {summary[name]['images']:7d} images "
           f"{summary[name]['patients']:6d} patients"
           for name in splits.SPLITS]
  lines.append(f"patients in more than one split: "
               f"{summary['patients_in_more_than_one_split']}")
  return _report(lines, "train.txt, val.txt, test.txt and summary.json",
                 args.out)


def _train(args, overrides) -> int:
  # The run's first lines (config, devices, batch sizes, parameters, split
  # sizes) are INFO records: show them whatever -v says.
  logging.getLogger("cxr_jax").setLevel(logging.INFO)
  from cxr_jax import parallel
  parallel.initialize_distributed(args.coordinator_address,
                                  args.num_processes, args.process_id,
                                  auto=args.distributed_auto)
  from cxr_jax import train
  from cxr_jax.config import load_config
  from cxr_jax.preemption import NonFiniteLoss, Preempted
  config = load_config(args.config, overrides)
  os.makedirs(args.workdir, exist_ok=True)
  try:
    summary = train.train_and_evaluate(config, args.workdir)
  except NonFiniteLoss as e:
    print(f"cxr-jax train: stopped: {e}", file=sys.stderr)
    return 3
  except Preempted as e:
    print(f"cxr-jax train: {e}", file=sys.stderr)
    return 143
  print(json.dumps(summary))
  return 0


def _evaluate(args) -> int:
  from cxr_jax import evaluation
  result = evaluation.evaluate(args.workdir, args.which, args.split,
                               data_dir=args.data_dir,
                               num_resamples=args.bootstrap)
  return _report([f"{args.split} split, {result['num_images']} images, "
                  f"checkpoint step {result['step']} ({args.which}):",
                  result["table"]],
                 "auc.csv, predictions.csv, roc.png, metrics.json",
                 result["out_dir"])


def _localize(args) -> int:
  from cxr_jax import localization
  s = localization.localize(args.workdir, args.data_dir, args.which,
                            args.threshold, upsampling=args.upsampling)
  lines = [f"{s['boxes']} boxes, CAM threshold {s['threshold']}:",
           f"{'class':20s} {'boxes':>5s} " + " ".join(
               f"{m}@{t:<4}" for m in ("IoU", "IoBB")
               for t in localization.THRESHOLDS)]
  row = lambda name, boxes, scores, prefix="": (
      f"{name:20s} {boxes:5d} " + " ".join(
          f"{scores[f'{prefix}{m}@{t}']:8.2f}" for m in ("iou", "iobb")
          for t in localization.THRESHOLDS))
  lines += [row(cls, r["boxes"], r) for cls, r in s["per_class"].items()]
  lines += [row("all", s["boxes"], s),
            row("chance", s["chance_boxes"], s, "chance_"),
            "chance: the same boxes scored against other films' boxes of "
            "their class"]
  return _report(lines, "localization.csv and overlays", s["out_dir"])


def _compare(args) -> int:
  from cxr_jax import compare
  result = compare.compare(args.runs, args.names, args.split, args.out)
  return _report([result["markdown"]],
                 "compare.md, auc.csv, summary.csv, delong.csv and bar.png",
                 result["out_dir"])


def _predict(args) -> int:
  from cxr_jax import predict
  result = predict.predict_files(args.workdir, args.images, args.which,
                                 cam_dir=args.cam, top=args.top,
                                 max_pixels=args.max_pixels)
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    if result["results"]:
      print(f"checkpoint step {result['step']} ({args.which}); "
            f"probabilities of the 14 diseases:")
      print(predict.format_table(result["results"]))
    if args.cam and result["results"]:
      print(f"wrote CAM overlays of the top {args.top} classes to {args.cam}")
  for e in result["errors"]:
    print(f"cxr-jax predict: {e['error']}", file=sys.stderr)
  if result["errors"]:
    print(f"cxr-jax predict: {len(result['errors'])} of {len(args.images)} "
          f"files could not be read", file=sys.stderr)
    return 1
  return 0


def _demo(args, overrides) -> int:
  logging.getLogger("cxr_jax").setLevel(logging.INFO)
  from cxr_jax import demo
  demo.run_demo(args.workdir, num_images=args.num_images,
                image_size=args.image_size,
                num_train_steps=args.num_train_steps,
                overrides=tuple(overrides))
  return 0


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _in_range(kind: type, low, high=None):
  """An argparse type: a number of `kind` in low..high (no upper bound if
  None), refused where the flag is parsed, before any work starts."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected {'a whole number' if kind is int else 'a number'}, "
          f"got {text!r}") from None
    if not (low <= value and (high is None or value <= high)):  # NaN fails
      span = f"at least {low}" if high is None else f"in {low}..{high}"
      raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
    return value
  return parse


def _folder(text: str) -> str:
  """An argparse type for a folder the command writes into: refused where a
  file stands at that path, before any work starts."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
  return text


def _max_pixels_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--max_pixels", type=_in_range(int, 1), default=None,
      help="refuse a film declaring more pixels than this, before decoding "
           "it (a small file can declare gigabytes); default "
           "$CXR_JAX_MAX_IMAGE_PIXELS, else 8192 x 8192")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cxr-jax", description="DeepCXray in JAX/Flax.")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="log every converted, kept and skipped "
                           "parameter, and the traceback of an error")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
      "convert-weights",
      help="convert Keras (.h5, .weights.h5) or torchvision (.pth) "
           "InceptionV3 ImageNet weights to a cxr_jax .npz file")
  p.add_argument("--model", default="inception_v3",
                 help="the backbone the weights belong to (cxr_jax.models)")
  p.add_argument("--source", required=True,
                 help="keras, torchvision, keras-imagenet, or the family's "
                      "other sources (e.g. timm)")
  p.add_argument("--input", help="the weights file (keras-imagenet: optional, "
                                 "downloaded through keras.applications)")
  p.add_argument("--output", required=True, help="the .npz file to write")
  p.add_argument("--torchvision_transform_input", type=_bool, default=True,
                 help="whether the torchvision model used transform_input "
                      "(True for torchvision's pretrained weights)")
  p.set_defaults(run=_convert_weights)

  p = sub.add_parser(
      "parity-check",
      help="build a backbone's reference (Keras application or torch module) "
           "with random weights, convert it and compare logits and feature "
           "maps")
  p.add_argument("--model", default="inception_v3")
  p.add_argument("--sizes", type=_in_range(int, 1), nargs="+",
                 default=[299, 224])
  p.add_argument("--batch", type=_in_range(int, 1), default=2)
  p.add_argument("--tolerance", type=_in_range(float, 0.0), default=1e-4)
  p.set_defaults(run=_parity_check)

  p = sub.add_parser("train", help="train a config; resumes from --workdir",
                     description="Extra --config.KEY=VALUE flags override the "
                                 "config file's fields.")
  p.add_argument("--config", required=True, help="configs/<experiment>.py")
  p.add_argument("--workdir", required=True, type=_folder)
  p.add_argument("--coordinator_address", default=None,
                 help="multi-host: host:port of process 0 (or "
                      "CXR_JAX_COORDINATOR)")
  p.add_argument("--num_processes", type=_in_range(int, 1), default=None)
  p.add_argument("--process_id", type=_in_range(int, 0), default=None)
  p.add_argument("--distributed_auto", action="store_true",
                 help="jax.distributed.initialize() with no arguments "
                      "(SLURM, Cloud TPU)")
  p.set_defaults(run=_train, takes_overrides=True)

  p = sub.add_parser("evaluate", help="AUC table with CIs, predictions, ROC "
                     "curves on a split of a trained run")
  p.add_argument("--workdir", required=True)
  p.add_argument("--which", choices=("best", "latest"), default="best")
  p.add_argument("--split", default="test", choices=("train", "val", "test"))
  p.add_argument("--data_dir", default=None,
                 help="the prepared dataset (default: the run's)")
  p.add_argument("--bootstrap", type=_in_range(int, 1), default=1000,
                 help="bootstrap resamples for the 95%% CIs")
  p.set_defaults(run=_evaluate)

  p = sub.add_parser("localize", help="CAM boxes against the ground-truth "
                     "boxes: IoU/IoBB accuracy per class, overlays")
  p.add_argument("--workdir", required=True)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--which", choices=("best", "latest"), default="best")
  p.add_argument("--threshold", type=_in_range(int, 1, 255), default=200,
                 help="CAM heat (1..255) at or above which a pixel joins "
                      "the predicted box")
  p.add_argument("--upsampling", default="receptive_field",
                 choices=("receptive_field", "resize"),
                 help="place CAM cells at their receptive-field centres, or "
                      "stretch the grid over the image")
  p.set_defaults(run=_localize)

  p = sub.add_parser("compare", help="runs side by side: per-class AUC "
                     "tables, mean +- SD over trials, DeLong tests, bar chart")
  p.add_argument("runs", nargs="+", help="run workdirs (their eval/<split>/) "
                 "or evaluation folders")
  p.add_argument("--names", nargs="+", default=None,
                 help="one name per run; runs with the same name are trials "
                      "of one experiment (mean +- SD)")
  p.add_argument("--split", default="test")
  p.add_argument("--out", default="compare", type=_folder,
                 help="output folder")
  p.set_defaults(run=_compare)

  p = sub.add_parser("predict", help="14 probabilities for PNG, JPEG or "
                     "DICOM films, optionally with CAM overlays")
  p.add_argument("--workdir", required=True)
  p.add_argument("images", nargs="+")
  p.add_argument("--which", choices=("best", "latest"), default="best")
  p.add_argument("--cam", default=None, metavar="OUTDIR", type=_folder,
                 help="write CAM overlays of the top classes here")
  p.add_argument("--top", type=_in_range(int, 1), default=3,
                 help="classes per image for --cam (and the JSON 'top')")
  p.add_argument("--json", action="store_true", help="JSON instead of a table")
  _max_pixels_flag(p)
  p.set_defaults(run=_predict)

  p = sub.add_parser("demo", help="synthesize, prepare, train, evaluate, "
                     "localize and report, end to end on synthetic data")
  p.add_argument("--workdir", default="demo_run", type=_folder)
  p.add_argument("--num_images", type=_in_range(int, 1), default=1200)
  p.add_argument("--image_size", type=_in_range(int, 1), default=299)
  p.add_argument("--num_train_steps", type=_in_range(int, 1), default=300)
  # e.g. --config.model.dtype=bfloat16: configs/tiny.py with that changed
  p.set_defaults(run=_demo, takes_overrides=True)

  p = sub.add_parser("synth", help="write a synthetic ChestX-ray14 in the "
                     "official layout, with planted findings and boxes")
  p.add_argument("--out", required=True, type=_folder)
  p.add_argument("--num_images", type=_in_range(int, 1), default=2000)
  p.add_argument("--image_size", type=_in_range(int, 1), default=256)
  p.add_argument("--seed", type=_in_range(int, 0), default=0)
  p.add_argument("--rgba_fraction", type=_in_range(float, 0.0, 1.0),
                 default=0.01)
  p.set_defaults(run=_synth)

  p = sub.add_parser("prepare", help="decode, gray, resize and write an NIH "
                     "folder as a TFDS ArrayRecord dataset")
  p.add_argument("--data_dir", required=True,
                 help="the NIH folder: CSVs, lists and images/")
  p.add_argument("--out", required=True, type=_folder,
                 help="the prepared dataset's folder")
  p.add_argument("--image_size", type=_in_range(int, 1), default=299)
  p.add_argument("--allow_missing", action="store_true",
                 help="build from the listed images present; count the rest")
  p.add_argument("--workers", type=_in_range(int, 1), default=None,
                 help="decoding processes (default: all cores)")
  p.add_argument("--png_compression", type=int, default=0, choices=range(10),
                 help="zlib level of the stored PNGs: 0 (default) is twice "
                      "the disk of 1 and half its decoding time")
  _max_pixels_flag(p)
  p.set_defaults(run=_prepare)

  p = sub.add_parser("splits", help="write train/val/test name lists")
  p.add_argument("--data_dir", required=True,
                 help="the NIH folder or a prepared dataset")
  p.add_argument("--scheme", required=True,
                 choices=("paper", "patient", "official"))
  p.add_argument("--seed", type=_in_range(int, 0), default=0,
                 help="the trial (Table 3's six trials are seeds 0-5)")
  p.add_argument("--out", required=True, type=_folder)
  p.add_argument("--view", choices=("PA", "AP"), default=None,
                 help="keep only one view position (default: both)")
  p.set_defaults(run=_splits)
  return parser


def _one_line(error: Exception) -> str:
  """The message of a user error, as the one line the CLI prints."""
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])  # str(KeyError) would quote it again
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return str(error)


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if a.startswith("--config.")]
  unknown = [a for a in extra if not a.startswith("--config.")]
  valueless = [a for a in overrides if "=" not in a]
  if valueless and getattr(args, "takes_overrides", False):
    # `--config.KEY VALUE` would otherwise be reported as an unknown VALUE.
    parser.error(f"{valueless[0]}: a config override is --config.KEY=VALUE")
  if unknown or (overrides and not getattr(args, "takes_overrides", False)):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  logging.basicConfig(
      level=logging.INFO if args.verbose else logging.WARNING,
      format="%(levelname)s %(name)s: %(message)s")
  try:
    if getattr(args, "takes_overrides", False):
      return args.run(args, overrides)
    return args.run(args)
  except (ValueError, KeyError, OSError) as e:
    # The project's errors (ConversionError, MetadataError, PrepareError,
    # ModelConfigError, ConfigError, ...) are ValueErrors whose message names
    # the file, flag or config key, and an OSError names the path the file
    # system refused: one line, unless -v asks for the traceback.
    if args.verbose:
      raise
    print(f"cxr-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
