"""Converted ImageNet weights compute what the source framework computes."""

import logging

import h5py
import numpy as np
import pytest

from conftest import random_variables
from cxr_jax import cli, parity, weights
from cxr_jax.models import FEATURE_MAP, InceptionV3
from cxr_jax.parity import keras as keras_parity
from cxr_jax.weights import common as weights_common
from cxr_jax.weights import inception_v3 as iv3_weights

TOLERANCE = 1e-4  # relative error, float32
MAX_ABS = 1e-4    # max abs error on logits, float32
REFERENCE = keras_parity.KERAS_REFERENCES["inception_v3"]


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
  pytest.importorskip("keras")
  model = keras_parity.build_keras_reference(REFERENCE, 299, seed=3)
  tmp = str(tmp_path_factory.mktemp("keras"))
  return model, keras_parity.save_keras_weights(model, tmp, "inception_v3")


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
@pytest.mark.slow
def test_keras_parity_logits_and_mixed_7c(keras_files, layout, tmp_path):
  model, paths = keras_files
  out = str(tmp_path / "w.npz")
  meta = weights.convert("inception_v3", "keras", paths[layout], out)
  assert meta["layout"] == layout and meta["num_classes"] == 1000
  assert weights.architecture(out) == ("inception_v3", {
      "pool_include_padding": False, "input_norm": "inception"})
  variables = weights.load_pretrained(out)
  rng = np.random.default_rng(0)
  # 224 and 299: SAME padding with stride 2 pads differently at even and
  # odd sizes; 91 is near the smallest input.
  for size in (299, 224, 91):
    reference = (model if size == 299
                 else keras_parity.keras_at_size(REFERENCE, model, size))
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    k_logits, k_map = keras_parity.keras_outputs(REFERENCE, reference, x)
    f_logits, f_map = parity.common.flax_outputs("inception_v3", variables, x)
    err_logits = parity.relative_error(f_logits, k_logits)
    err_map = parity.relative_error(f_map, k_map)
    print(f"{layout}@{size}: logits {err_logits:.2e} "
          f"(max abs {parity.max_abs_error(f_logits, k_logits):.1e}), "
          f"{FEATURE_MAP} {err_map:.2e}")
    assert err_logits <= TOLERANCE and err_map <= TOLERANCE
    assert parity.max_abs_error(f_logits, k_logits) <= MAX_ABS


@pytest.mark.slow
def test_parity_check_command_runs_for_inception_v3(capsys):
  assert cli.main(["parity-check", "--model", "inception_v3", "--sizes",
                   "91", "--batch", "1"]) == 0
  out = capsys.readouterr().out
  assert "PASS: inception_v3" in out and "keras3@91/logits" in out
  assert cli.main(["parity-check", "--model", "no_such_net"]) == 2


@pytest.mark.slow
def test_keras2_names_convert_identically(keras_files, tmp_path):
  """The real ImageNet file was written by Keras 2: 1-based names
  (conv2d_1 ...) and ':0' weight names. Renaming must not change the result."""
  _, paths = keras_files
  renamed = str(tmp_path / "keras2.h5")
  with h5py.File(paths["legacy"]) as src, h5py.File(renamed, "w") as dst:
    def k2(name):
      base, _, num = name.rpartition("_")
      if num.isdigit():
        return f"{base}_{int(num) + 1}"
      return f"{name}_1" if name.startswith(("conv2d", "batch_norm")) else name
    names = [n.decode() if isinstance(n, bytes) else n
             for n in src.attrs["layer_names"]]
    dst.attrs["layer_names"] = [k2(n).encode() for n in names]
    for n in names:
      g = dst.create_group(k2(n))
      wnames = [w.decode() if isinstance(w, bytes) else w
                for w in src[n].attrs["weight_names"]]
      new_names = []
      for w in wnames:
        new = f"{k2(n)}/{w.split('/')[-1]}:0"
        g.create_dataset(new, data=src[n][w][()])
        new_names.append(new.encode())
      g.attrs["weight_names"] = new_names
  a, _ = iv3_weights.convert_keras(paths["legacy"])
  b, _ = iv3_weights.convert_keras(renamed)
  for x, y in zip(weights_common.flatten(a).values(),
                  weights_common.flatten(b).values()):
    np.testing.assert_array_equal(x, y)


def test_truncated_and_foreign_files_get_clear_errors(tmp_path):
  # Any HDF5 file cut short is a truncated download; building a Keras
  # network for it would cost a minute.
  whole = tmp_path / "whole.h5"
  with h5py.File(whole, "w") as f:
    f.create_dataset("kernel", data=np.arange(100_000, dtype=np.float32))
  truncated = tmp_path / "truncated.h5"
  truncated.write_bytes(whole.read_bytes()[:50_000])
  paths = {"legacy": str(whole)}
  with pytest.raises(weights.ConversionError, match="truncated.h5"):
    iv3_weights.convert_keras(str(truncated))
  text = tmp_path / "notes.h5"
  text.write_text("not hdf5")
  with pytest.raises(weights.ConversionError, match="not a readable HDF5"):
    iv3_weights.convert_keras(str(text))
  empty = tmp_path / "empty.h5"
  with h5py.File(empty, "w") as f:
    f.create_group("something")
  with pytest.raises(weights.ConversionError, match="neither a legacy"):
    iv3_weights.convert_keras(str(empty))
  with pytest.raises(FileNotFoundError, match="missing.h5"):
    iv3_weights.convert_keras(str(tmp_path / "missing.h5"))
  assert cli.main(["convert-weights", "--source", "keras", "--input",
                   str(text), "--output", str(tmp_path / "o.npz")]) == 2
  with pytest.raises(weights.ConversionError, match="--model"):
    weights.convert("no_such_net", "keras", paths["legacy"], "o.npz")
  with pytest.raises(weights.ConversionError, match="--source"):
    weights.convert("inception_v3", "caffe", paths["legacy"], "o.npz")


@pytest.mark.slow
def test_15_output_model_from_the_1000_class_file(keras_files, tmp_path,
                                                  caplog):
  import jax
  import jax.numpy as jnp
  _, paths = keras_files
  out = str(tmp_path / "imagenet.npz")
  weights.convert("inception_v3", "keras", paths["legacy"], out)
  model = InceptionV3(num_classes=15)
  # Any values of the model's shapes serve as the initial variables here:
  # merging is under test, and compiling InceptionV3's init would cost more
  # than the rest of the test.
  init = random_variables(model, 75)
  with caplog.at_level(logging.INFO, logger="cxr_jax.weights"):
    merged = weights.merge_pretrained(init, weights.load_pretrained(out),
                                      dont_load=[r"^params/head/"])
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                init["params"]["head"]["kernel"])
  pretrained = weights.load_pretrained(out)
  np.testing.assert_array_equal(
      merged["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
      pretrained["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"])
  np.testing.assert_array_equal(
      merged["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"],
      pretrained["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"])
  text = caplog.text
  assert "kept at init (dont_load): params/head/kernel (2048, 15)" in text
  assert "kept at init (dont_load): params/head/bias (15,)" in text
  # The merged variables are the model's: it traces with them.
  assert jax.eval_shape(model.apply, merged, jnp.zeros((1, 75, 75, 3))
                        ).shape == (1, 15)

  with pytest.raises(weights.ConversionError,
                     match=r"params/head/kernel: model shape \(2048, 15\) != "
                           r"file shape \(2048, 1000\)"):
    weights.merge_pretrained(init, weights.load_pretrained(out))
  aux = InceptionV3(num_classes=15, aux_logits=True)
  aux_init = jax.eval_shape(lambda: aux.init(jax.random.key(0),
                                             jnp.zeros((1, 299, 299, 3))))
  with pytest.raises(weights.ConversionError,
                     match="params/AuxLogits/conv0/conv/kernel.*missing"):
    weights.merge_pretrained(aux_init, weights.load_pretrained(out),
                             dont_load=[r"^params/head/"])


@pytest.mark.slow
def test_cli_writes_a_loadable_file(keras_files, tmp_path, capsys):
  _, paths = keras_files
  out = str(tmp_path / "cli.npz")
  assert cli.main(["convert-weights", "--source", "keras", "--input",
                   paths["keras3"], "--output", out]) == 0
  assert "wrote" in capsys.readouterr().out
  assert weights.read_metadata(out)["source"] == "keras"
  assert weights.architecture(out)[1]["pool_include_padding"] is False
  with pytest.raises(weights.ConversionError, match="not a converted"):
    bad = tmp_path / "bad.npz"
    bad.write_text("x")
    weights.load_pretrained(str(bad))


# ---------------------------------------------------------------- torchvision

@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
  torch = pytest.importorskip("torch")
  import torchvision_reference as ref
  sd = ref.random_state_dict(seed=5)
  path = str(tmp_path_factory.mktemp("tv") / "inception_v3.pth")
  torch.save(sd, path)
  return sd, path


def test_reference_state_dict_has_torchvisions_parameter_count(
    torchvision_file):
  import torchvision_reference as ref
  sd, _ = torchvision_file
  assert ref.num_trainable(sd) == ref.TORCHVISION_NUM_PARAMS


@pytest.mark.parametrize("transform_input", [True, False])
@pytest.mark.slow
def test_torchvision_parity(torchvision_file, transform_input, tmp_path):
  import torch
  import torchvision_reference as ref
  sd, path = torchvision_file
  out = str(tmp_path / "tv.npz")
  weights.convert("inception_v3", "torchvision", path, out,
                  transform_input=transform_input)
  variables = weights.load_pretrained(out)
  name, kwargs = weights.architecture(out)
  assert name == "inception_v3" and kwargs == {"pool_include_padding": True,
                                               "input_norm": "inception"}
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  x_torch = ref.imagenet_normalize((torch.from_numpy(x).permute(0, 3, 1, 2)
                                    + 1) / 2)
  t_logits, t_map = ref.forward(sd, x_torch, transform_input)
  t_aux = ref.aux_forward(sd, x_torch, transform_input)
  model = InceptionV3(num_classes=1000, aux_logits=True, **kwargs)
  logits, feats = model.apply(variables, x, return_features=True)
  errs = {
      "logits": parity.relative_error(logits, t_logits.numpy()),
      FEATURE_MAP: parity.relative_error(
          feats[FEATURE_MAP], t_map.permute(0, 2, 3, 1).numpy()),
      "aux_logits": parity.relative_error(feats["aux_logits"],
                                          t_aux.numpy()),
  }
  print(f"torchvision transform_input={transform_input}: {errs}")
  assert max(errs.values()) <= TOLERANCE
  # Keras-style pools would compute something else: the flag matters.
  keras_style = InceptionV3(num_classes=1000, aux_logits=True).apply(
      variables, x)
  assert parity.relative_error(keras_style, t_logits.numpy()) > 1e-3


def test_torchvision_errors(tmp_path):
  torch = pytest.importorskip("torch")
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(weights.ConversionError, match="bad.pth"):
    iv3_weights.convert_torchvision(str(bad))
  partial = tmp_path / "partial.pth"
  torch.save({"fc.weight": torch.zeros(1000, 2048)}, partial)
  with pytest.raises(weights.ConversionError,
                     match="missing torchvision key 'Conv2d_1a_3x3.conv.weight'"):
    iv3_weights.convert_torchvision(str(partial))


def test_scanned_groups_split_into_blocks_and_stack_back():
  repeated = {"block35": ("block35_1", "block35_2")}
  shapes = {"block35/conv/kernel": (2, 1, 1, 4, 4), "head/bias": (15,)}
  assert weights_common.per_block_shapes(shapes, repeated) == {
      "block35_1/conv/kernel": (1, 1, 4, 4),
      "block35_2/conv/kernel": (1, 1, 4, 4), "head/bias": (15,)}
  flat = {"block35_2/conv/kernel": np.full((1, 1, 4, 4), 2.0),
          "block35_1/conv/kernel": np.full((1, 1, 4, 4), 1.0),
          "head/bias": np.zeros(15)}
  stacked = weights_common.stack_blocks(flat, repeated)
  assert set(stacked) == {"block35/conv/kernel", "head/bias"}
  np.testing.assert_array_equal(stacked["block35/conv/kernel"][:, 0, 0, 0, 0],
                                [1.0, 2.0])  # in the group's order
  with pytest.raises(ValueError, match="block35/conv/kernel.*lead with 2"):
    weights_common.per_block_shapes({"block35/conv/kernel": (3, 4)}, repeated)
  # A group may be nested (a ResNet stage's blocks after its first).
  nested = {"layer3/repeated": ("layer3/1", "layer3/2")}
  assert weights_common.per_block_shapes(
      {"layer3/repeated/conv1/kernel": (2, 3), "layer3/0/conv1/kernel": (3,)},
      nested) == {"layer3/1/conv1/kernel": (3,), "layer3/2/conv1/kernel": (3,),
                  "layer3/0/conv1/kernel": (3,)}
  assert set(weights_common.stack_blocks(
      {"layer3/1/bn/mean": np.zeros(3), "layer3/2/bn/mean": np.ones(3),
       "layer3/10/bn/mean": np.ones(3)}, nested)) == {
           "layer3/repeated/bn/mean", "layer3/10/bn/mean"}
