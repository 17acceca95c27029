"""Issue 13, the CLI's share: a bad flag, config value or input file ends in
one line that names the culprit and a non-zero exit, never a traceback;
flags are range-checked where they are parsed, before any work starts."""

from __future__ import annotations

import glob
import json
import os
import urllib.error

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from cxr_jax import cli, compare, config, evaluation, inference
from cxr_jax import labels as L
from cxr_jax.data import synthetic, tfds_builder

TINY = str(ROOT / "configs" / "tiny.py")


def _one_error_line(capsys, command: str) -> str:
  """The CLI's stderr, checked to be one `cxr-jax CMD: error: ...` line."""
  err = capsys.readouterr().err.strip()
  assert "Traceback" not in err, err
  line = err.splitlines()[-1]
  assert line.startswith(f"cxr-jax {command}: error: "), err
  return line


@pytest.mark.parametrize("override, culprit", [
    ("--config.learning_rate=abc", "--config.learning_rate='abc': expected "
                                   "float"),
    ("--config.learning_rate=nan", "--config.learning_rate=nan must be a "
                                   "finite number"),
    ("--config.batch_size=0", "--config.batch_size=0 must be at least 1"),
    ("--config.image_size=64", "--config.image_size=64 is too small for "
                               "inception_v3, which needs at least 75 px"),
    ("--config.aux_task=maybe", "--config.aux_task='maybe': expected bool"),
    ("--config.learning_rate.x=1", "'learning_rate' is not a section"),
])
def test_train_config_errors_name_the_override(override, culprit, tmp_path,
                                               capsys):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir),
                   override]) == 2
  assert culprit in _one_error_line(capsys, "train")
  assert not workdir.exists()  # refused before anything was written


def test_demo_takes_overrides_and_refuses_a_bad_one_first(tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(workdir),
                   "--config.model.dtype=float16"]) == 2
  assert "model.dtype" in _one_error_line(capsys, "demo")
  assert not workdir.exists()  # refused before synthesis


@pytest.mark.parametrize("argv", [
    ["--config.learning_rate"], ["--config.learning_rate", "0.1"]])
def test_an_override_without_a_value_is_named(argv, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), *argv])
  assert e.value.code == 2
  assert ("--config.learning_rate: a config override is --config.KEY=VALUE"
          in capsys.readouterr().err)
  with pytest.raises(config.ConfigError, match="not --config.KEY=VALUE"):
    config.load_config(TINY, ["--config.learning_rate"])


def test_every_range_is_checked_where_the_config_is_loaded():
  for key, bad in [("eval_every_steps", 0), ("augment_min_crop", 0.0),
                   ("log_every_steps", 0), ("split_seed", -1),
                   ("learning_rate", -1e-3), ("max_eval_images", -1)]:
    with pytest.raises(config.ConfigError, match=f"--config.{key}="):
      config.load_config(TINY, [f"{key}={bad}"])
  # The backbone's own floor, from its family: a small-input family passes.
  c = config.load_config(TINY, ["model_name=resnet50", "image_size=64"])
  assert c.image_size == 64


def test_a_registered_backbone_without_a_declared_floor_loads(monkeypatch):
  # A user's own network (here the tests' SmallNet, whose module declares no
  # MIN_INPUT_SIZE) is left to its own forward pass, not refused by a bug.
  from conftest import SmallNet
  from cxr_jax import models
  monkeypatch.setitem(models.MODELS, "small_net", (SmallNet, {}))
  assert models.min_input_size("small_net") is None
  c = config.load_config(TINY, ["model_name=small_net", "image_size=16"])
  assert c.image_size == 16


@pytest.fixture
def a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  return str(path)


# Each command's flags, out of range or naming a file where a folder goes:
# argparse refuses them (exit 2, usage and one error line naming the flag).
BAD_FLAGS = [
    (["prepare", "--data_dir", "NIH", "--out", "OUT", "--image_size", "0"],
     "argument --image_size: must be at least 1, got 0"),
    (["prepare", "--data_dir", "NIH", "--out", "OUT", "--workers", "-1"],
     "argument --workers: must be at least 1, got -1"),
    (["prepare", "--data_dir", "NIH", "--out", "FILE"],
     "argument --out: FILE is a file, not a folder"),
    (["prepare", "--data_dir", "NIH", "--out", "OUT", "--max_pixels", "0"],
     "argument --max_pixels: must be at least 1, got 0"),
    (["splits", "--data_dir", "NIH", "--scheme", "paper", "--seed", "-1",
      "--out", "OUT"], "argument --seed: must be at least 0, got -1"),
    (["splits", "--data_dir", "NIH", "--scheme", "paper", "--out", "FILE"],
     "argument --out: FILE is a file, not a folder"),
    (["evaluate", "--workdir", "W", "--bootstrap", "0"],
     "argument --bootstrap: must be at least 1, got 0"),
    (["localize", "--workdir", "W", "--threshold", "300"],
     "argument --threshold: must be in 1..255, got 300"),
    (["synth", "--out", "OUT", "--num_images", "0"],
     "argument --num_images: must be at least 1, got 0"),
    (["synth", "--out", "OUT", "--rgba_fraction", "nan"],
     "argument --rgba_fraction: must be in 0.0..1.0, got nan"),
    (["synth", "--out", "FILE"], "argument --out: FILE is a file"),
    (["compare", "RUN", "--out", "FILE"], "argument --out: FILE is a file"),
    (["predict", "--workdir", "W", "x.png", "--cam", "FILE"],
     "argument --cam: FILE is a file"),
    (["predict", "--workdir", "W", "x.png", "--top", "0"],
     "argument --top: must be at least 1, got 0"),
    (["demo", "--num_train_steps", "abc"],
     "argument --num_train_steps: expected a whole number, got 'abc'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS,
                         ids=[f"{a[0]} {m.split(':')[0].split()[-1]}"
                              for a, m in BAD_FLAGS])
def test_flags_are_range_checked_where_parsed(argv, message, tmp_path, a_file,
                                              capsys):
  out = str(tmp_path / "out")
  argv = [{"FILE": a_file, "OUT": out}.get(a, a) for a in argv]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert message.replace("FILE", a_file) in err.splitlines()[-1]
  assert not os.path.exists(out)  # nothing started


def test_library_entry_points_refuse_the_same_values(tmp_path):
  with pytest.raises(ValueError, match="--num_images"):
    synthetic.synthesize(str(tmp_path / "s"), num_images=0)
  with pytest.raises(ValueError, match="--bootstrap"):  # before restoring
    evaluation.evaluate(str(tmp_path / "no_run"), num_resamples=0)


def test_a_file_system_error_is_one_line(tmp_path, a_file, capsys):
  """What the parser cannot see (here: a file where a parent folder goes)
  is an OSError: one line naming the path."""
  out = os.path.join(a_file, "splits")
  assert cli.main(["synth", "--out", out, "--num_images", "1"]) == 2
  assert a_file in _one_error_line(capsys, "synth")


def _metrics(auc=0.5) -> dict:
  return {"mean_auc": auc, "auc": {d: auc for d in L.DISEASES}}


@pytest.mark.parametrize("content, message", [
    ('{"mean_auc": 0.7, "auc": {', "not the JSON `cxr-jax evaluate` writes"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"mean_auc": 0.7, "auc": [0.7]}), "'auc' is not a mapping"),
    (json.dumps(_metrics("high")), "an AUC is 'high', not a number"),
    (json.dumps({"auc": {}}), "field 'mean_auc' is missing"),
])
def test_compare_names_a_corrupt_metrics_json(content, message, tmp_path,
                                              capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.json").write_text(content)
  assert cli.main(["compare", str(run), "--out", str(tmp_path / "c")]) == 2
  line = _one_error_line(capsys, "compare")
  assert str(run / "metrics.json") in line and message in line


@pytest.mark.parametrize("predictions, message", [
    ("", "unexpected header"),
    (",".join(evaluation.PREDICTION_COLUMNS) + "\nx.png,0.5\n",
     "line 2 does not have the 29 columns"),
])
def test_compare_names_a_corrupt_predictions_csv(predictions, message,
                                                 tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.json").write_text(json.dumps(_metrics()))
  (run / "predictions.csv").write_text(predictions)
  assert cli.main(["compare", str(run), "--out", str(tmp_path / "c")]) == 2
  line = _one_error_line(capsys, "compare")
  assert str(run / "predictions.csv") in line and message in line


def test_compare_names_a_wrong_names_count(tmp_path, capsys):
  assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                   "--names", "one", "--out", str(tmp_path / "c")]) == 2
  assert "--names has 1 entries for 2 runs" in _one_error_line(capsys,
                                                               "compare")
  with pytest.raises(ValueError, match="--names"):
    compare.compare([str(tmp_path / "a")], ["x", "y"])


@pytest.fixture(scope="module")
def data_without_boxes(tmp_path_factory) -> str:
  """A prepared dataset whose NIH folder had no BBox_List_2017.csv."""
  root = tmp_path_factory.mktemp("nobox")
  synthetic.synthesize(str(root / "nih"), num_images=12, image_size=80,
                       seed=1, workers=1)
  for path in glob.glob(str(root / "nih" / "BBox*")):
    os.remove(path)
  tfds_builder.prepare(str(root / "nih"), str(root / "prepared"),
                       image_size=75, workers=1)
  return str(root / "prepared")


class FakeRun:
  """Stands in for a restored run (`inference.Predictor`): what `localize`
  and `predict` read of it, and fixed outputs for any films."""

  size, batch_size, step, grid = 75, 8, 1, (5, 7.5, 15.0)

  def __init__(self, data_dir: str = ""):
    self.config = ml_collections.ConfigDict({"data_dir": data_dir})

  def __call__(self, films):
    n = len(films)
    probs = np.tile(np.linspace(0.1, 0.9, L.NUM_DISEASES), (n, 1))
    maps = np.random.default_rng(0).random((n, 5, 5, L.NUM_DISEASES))
    return probs, maps.astype(np.float32)


def test_localize_on_data_without_boxes_is_one_line(data_without_boxes,
                                                    monkeypatch, capsys):
  # The box list is read before any film is predicted.
  monkeypatch.setattr(inference, "Predictor",
                      lambda workdir, which: FakeRun(data_without_boxes))
  assert cli.main(["localize", "--workdir", "W"]) == 2
  line = _one_error_line(capsys, "localize")
  assert data_without_boxes in line and "no box list" in line


def test_keras_imagenet_offline_is_one_line(tmp_path, monkeypatch, capsys):
  """keras' download fails as it does offline (a URLError, which
  keras.utils.get_file re-raises as a plain Exception): one line naming the
  source."""
  import keras
  import keras.src.utils.file_utils as file_utils

  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")

  def inception_v3(weights):
    # What keras.applications.InceptionV3(weights='imagenet') does after
    # building the network (which takes seconds): fetch the file.
    assert weights == "imagenet"
    keras.utils.get_file(
        "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
        "https://storage.googleapis.com/tensorflow/keras-applications/"
        "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
        cache_dir=str(tmp_path / "keras"), cache_subdir="models")

  monkeypatch.setattr(file_utils, "urlretrieve", offline)
  monkeypatch.setattr(keras.applications, "InceptionV3", inception_v3)
  out = tmp_path / "w.npz"
  assert cli.main(["convert-weights", "--source", "keras-imagenet",
                   "--output", str(out)]) == 2
  line = _one_error_line(capsys, "convert-weights")
  assert "--source keras-imagenet: downloading" in line
  assert "Name or service not known" in line and "--input FILE" in line
  assert not out.exists()


def test_predict_cam_keeps_films_of_the_same_name_apart(tmp_path, monkeypatch,
                                                        capsys):
  """`a/dup.png` and `b/dup.png` get an overlay each; neither overwrites."""
  monkeypatch.setattr(inference, "Predictor",
                      lambda workdir, which: FakeRun())
  films = []
  for folder, value in (("a", 60), ("b", 200)):
    (tmp_path / folder).mkdir()
    films.append(str(tmp_path / folder / "dup.png"))
    Image.new("L", (90, 90), value).save(films[-1])
  cams = tmp_path / "cams"
  assert cli.main(["predict", "--workdir", "W", *films, "--cam", str(cams),
                   "--top", "1", "--json"]) == 0
  results = json.loads(capsys.readouterr().out)["results"]
  overlays = [c["overlay"] for r in results for c in r["cams"].values()]
  assert len(set(overlays)) == 2
  assert sorted(os.listdir(cams)) == sorted(os.path.basename(o)
                                            for o in overlays)


def test_predict_max_pixels_refuses_large_films_before_decoding(
    tmp_path, monkeypatch, capsys):
  """--max_pixels reaches both readers: the PNG and the DICOM film declare
  40 x 40 pixels, above a limit of 1,000, and are named; the others run."""
  from conftest import write_dicom
  monkeypatch.setattr(inference, "Predictor",
                      lambda workdir, which: FakeRun())
  png, dcm, small = (str(tmp_path / n) for n in ("big.png", "big.dcm",
                                                 "small.png"))
  Image.new("L", (40, 40), 90).save(png)
  write_dicom(dcm, np.full((40, 40), 2000, np.uint16), "MONOCHROME2")
  Image.new("L", (30, 30), 90).save(small)
  assert cli.main(["predict", "--workdir", "W", png, dcm, small,
                   "--max_pixels", "1000", "--json"]) == 1
  captured = capsys.readouterr()
  assert [r["image"] for r in json.loads(captured.out)["results"]] == [small]
  for path in (png, dcm):
    assert f"{path} declares 40 x 40 = 1,600 pixels" in captured.err


def test_a_pickled_npz_as_init_weights_is_refused_naming_it(tmp_path):
  from cxr_jax import weights
  path = tmp_path / "pickled.npz"
  np.savez(path, params=np.array([{"kernel": 1}], dtype=object))
  with pytest.raises(weights.ConversionError, match=str(path)):
    weights.load_pretrained(str(path))
  meta = tmp_path / "pickled_meta.npz"
  np.savez(meta, __meta__=np.array([{"model": 1}], dtype=object))
  with pytest.raises(weights.ConversionError, match=str(meta)):
    weights.read_metadata(str(meta))


def test_a_pth_with_a_non_tensor_or_a_wrong_rank_is_named(tmp_path):
  torch = pytest.importorskip("torch")
  from cxr_jax import weights
  from cxr_jax.parity import torch_resnet
  sd = torch_resnet.build_torch_reference("resnet50").state_dict()
  odd = tmp_path / "odd.pth"
  torch.save(dict(sd, **{"layer1.0.conv1.weight": "a string"}), odd)
  with pytest.raises(weights.ConversionError,
                     match=r"odd\.pth: 1 entries are not tensors.*"
                           r"layer1\.0\.conv1\.weight"):
    weights.convert("resnet50", "torchvision", str(odd),
                    str(tmp_path / "out.npz"))
  flat = tmp_path / "flat.pth"
  torch.save(dict(sd, **{"layer1.0.conv1.weight": torch.zeros(64, 64)}),
             flat)
  with pytest.raises(weights.ConversionError, match=r"flat\.pth"):
    weights.convert("resnet50", "torchvision", str(flat),
                    str(tmp_path / "out.npz"))
