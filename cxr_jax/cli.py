"""The `cxr-jax` command. Each subcommand parses flags and calls one library
function; nothing here computes anything itself."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _convert_weights(args) -> int:
  from cxr_jax import weights
  meta = weights.convert(args.source, args.input, args.output,
                         transform_input=args.torchvision_transform_input)
  print(f"wrote {args.output}: {json.dumps(meta)}")
  return 0


def _parity_check(args) -> int:
  from cxr_jax import parity
  errors = parity.keras_parity(sizes=tuple(args.sizes), batch=args.batch)
  worst = max(errors.values())
  for name, err in errors.items():
    print(f"{name:32s} relative error {err:.3e}")
  ok = worst <= args.tolerance
  print(f"{'PASS' if ok else 'FAIL'}: worst relative error {worst:.3e} "
        f"(tolerance {args.tolerance:g})")
  return 0 if ok else 1


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cxr-jax", description="DeepCXray in JAX/Flax.")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="log every converted, kept and skipped parameter")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
      "convert-weights",
      help="convert Keras (.h5, .weights.h5) or torchvision (.pth) "
           "InceptionV3 ImageNet weights to a cxr_jax .npz file")
  p.add_argument("--source", required=True,
                 choices=("keras", "torchvision", "keras-imagenet"))
  p.add_argument("--input", help="the weights file (keras-imagenet: optional, "
                                 "downloaded through keras.applications)")
  p.add_argument("--output", required=True, help="the .npz file to write")
  p.add_argument("--torchvision_transform_input", type=_bool, default=True,
                 help="whether the torchvision model used transform_input "
                      "(True for torchvision's pretrained weights)")
  p.set_defaults(run=_convert_weights)

  p = sub.add_parser(
      "parity-check",
      help="build Keras' InceptionV3 with random weights, convert both of its "
           "weight layouts and compare logits and Mixed_7c maps")
  p.add_argument("--sizes", type=int, nargs="+", default=[299, 107])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--tolerance", type=float, default=1e-4)
  p.set_defaults(run=_parity_check)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(
      level=logging.INFO if args.verbose else logging.WARNING,
      format="%(levelname)s %(name)s: %(message)s")
  from cxr_jax.weights import ConversionError
  try:
    return args.run(args)
  except (ConversionError, FileNotFoundError) as e:
    print(f"cxr-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
