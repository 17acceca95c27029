"""Inception V4: parity with the timm/pretrainedmodels reference (both
sources, 224 and 299 px), the converters' errors, parameter count, heads,
dtype and CAM geometry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models, weights
from cxr_jax.models import inception_v4 as v4
from cxr_jax.models.common import count_parameters, lse_pool
from cxr_jax.parity.common import max_abs_error
from cxr_jax.weights import inception_v4 as convert
from cxr_jax.weights.common import ConversionError, flatten, per_block_shapes

NAME = "inception_v4"
TOLERANCE = 1e-4  # max abs error on logits, float32
# pretrainedmodels' and timm's InceptionV4(num_classes=1000): parameters
# only (BatchNorm statistics excluded), as published (42.7M).
PUBLISHED = 42_679_816


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """{source: (torch reference, .pth path, converted variables, meta)}.
  pretrainedmodels' file has 1001 classes; it is converted with
  drop_background so that both sources share one compiled forward."""
  pytest.importorskip("torch")
  from cxr_jax.parity import torch_inception_v4 as ref
  tmp = tmp_path_factory.mktemp("v4")
  out = {}
  for seed, source in enumerate(ref.HEADS):
    net = ref.build_reference(source, seed=seed)
    pth = ref.save_state_dict(net, str(tmp / f"{source}.pth"))
    options = {"drop_background": True} if source == "pretrainedmodels" else {}
    variables, meta = convert.SOURCES[source](pth, **options)
    out[source] = (net, pth, variables, meta)
  return out


@pytest.fixture(scope="module")
def forward():
  model = v4.InceptionV4()
  return jax.jit(lambda v, x: model.apply(v, x, return_features=True))


@pytest.mark.parametrize("size", [224, 299])
@pytest.mark.slow
def test_torch_parity(references, forward, size):
  from cxr_jax.parity import torch_inception_v4 as ref
  x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)
                                          ).astype(np.float32)
  for source, (net, _, variables, meta) in references.items():
    assert meta["source"] == source and meta["num_classes"] == 1000
    t_logits, t_map = ref.reference_outputs(net, x)
    if source == "pretrainedmodels":
      t_logits = t_logits[:, 1:]  # drop_background
    # Random weights must leave a signal, or the comparison proves nothing.
    assert t_logits.std() > 1e-2 and t_map.std() > 1e-2
    logits, out = forward(variables, x)
    err_logits = max_abs_error(logits, t_logits)
    err_map = max_abs_error(out["features"], t_map)
    print(f"{source}@{size}: logits {err_logits:.2e}, features "
          f"{err_map:.2e}")
    assert err_logits <= TOLERANCE and err_map <= TOLERANCE
  np.testing.assert_allclose(out["class_maps"].mean((1, 2)), logits,
                             atol=1e-5)
  cells, _, _ = v4.feature_grid(size)
  assert out["features"].shape == (2, cells, cells, 1536)
  assert out["pooled"].shape == (2, 1536)


def test_pretrainedmodels_head_is_kept_or_dropped(references):
  net, pth, dropped, _ = references["pretrainedmodels"]
  full, meta = convert.convert_pretrainedmodels(pth)
  assert meta["num_classes"] == 1001 and not meta["drop_background"]
  w = net.last_linear.weight.detach().numpy()
  np.testing.assert_array_equal(full["params"]["head"]["kernel"], w.T)
  np.testing.assert_array_equal(dropped["params"]["head"]["kernel"],
                                w[1:].T)
  with pytest.raises(ConversionError, match=r"timm\.pth.*1001-way.*1000"):
    convert.convert_pretrainedmodels(references["timm"][1],
                                     drop_background=True)


def test_feature_grid_by_hand():
  # Seven 3x3 VALID layers move the grid (two stem convs, Mixed_3a's stride
  # 2, Mixed_4a's 3x3, Mixed_5a, Mixed_6a, Mixed_7a): cell 0's centre moves
  # one input step of each, 1+2+2+4+4+8+16 = 37 px from 0.5.
  assert v4.feature_grid(299) == (8, 37.5, 32.0)
  assert 299 - (37.5 + 32 * 7) == 37.5  # symmetric at 299
  assert v4.feature_grid(224) == (5, 37.5, 32.0)
  assert v4.InceptionV4().feature_grid(75)[0] == 1


def test_parameter_count(references):
  from cxr_jax.parity import torch_inception_v4 as ref
  model = v4.InceptionV4(num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 75, 75, 3))))
  assert count_parameters(shapes["params"]) == PUBLISHED
  for source in ref.HEADS:
    assert ref.parameter_count(ref.build_reference(
        source, num_classes=1000)) == PUBLISHED
  # Every BatchNorm keeps PyTorch's gamma; no convolution has a bias.
  params = per_block_shapes({k: v.shape for k, v in flatten(
      shapes["params"]).items()}, v4.REPEATED)
  assert sum(k.endswith("bn/scale") for k in params) == 149
  assert not any(k.endswith("conv/bias") for k in params)


def test_registry_row_module_prefix_and_meta(references,
                                             tmp_path):
  import torch
  assert isinstance(models.build(NAME, num_classes=15), v4.InceptionV4)
  net, pth, variables, _ = references["timm"]
  # DataParallel checkpoints prefix every key with 'module.'.
  wrapped = str(tmp_path / "wrapped.pth")
  torch.save({"state_dict": {f"module.{k}": v
                             for k, v in net.state_dict().items()}}, wrapped)
  out = str(tmp_path / "w.npz")
  meta = weights.convert(NAME, "timm", wrapped, out)
  assert meta["model"] == NAME and meta["source"] == "timm"
  assert weights.architecture(out) == (NAME, {"input_norm": "inception"})
  a, b = flatten(weights.load_pretrained(out)), flatten(variables)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_converters_name_missing_mismatched_and_wrong_files(references,
                                                            tmp_path):
  import torch
  net, pth, _, _ = references["timm"]
  sd = net.state_dict()
  missing = {k: v for k, v in sd.items()
             if k != "features.12.branch2.3.bn.running_var"}
  torch.save(missing, tmp_path / "missing.pth")
  with pytest.raises(ConversionError, match=r"missing\.pth.*"
                     r"features\.12\.branch2\.3\.bn\.running_var"):
    convert.convert_timm(str(tmp_path / "missing.pth"))
  bad = dict(sd)
  bad["features.20.branch2_1.conv.weight"] = torch.zeros(448, 384, 1, 3)
  torch.save(bad, tmp_path / "shape.pth")
  with pytest.raises(ConversionError, match=r"shape\.pth(.|\n)*"
                     r"Mixed_7c/branch2_1/conv/kernel: model shape"):
    convert.convert_timm(str(tmp_path / "shape.pth"))
  (tmp_path / "notes.pth").write_text("not a checkpoint")
  with pytest.raises(ConversionError, match="notes.pth"):
    convert.convert_pretrainedmodels(str(tmp_path / "notes.pth"))
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)},
             tmp_path / "resnet.pth")
  with pytest.raises(ConversionError, match=r"resnet\.pth.*"
                     r"features\.0\.conv\.weight"):
    convert.convert_timm(str(tmp_path / "resnet.pth"))


@pytest.mark.slow
def test_lse_head_and_bfloat16_at_the_smallest_size(references):
  variables = references["timm"][2]
  model = v4.InceptionV4(dtype=jnp.bfloat16, head_pooling="lse")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)
                                       ).astype(np.float32)
  logits, out = jax.jit(lambda v, x: model.apply(
      v, x, return_features=True))(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 1000)
  assert out["features"].dtype == jnp.bfloat16
  assert out["class_maps"].shape == (2, 1, 1, 1000)
  np.testing.assert_allclose(lse_pool(out["class_maps"], model.lse_r),
                             logits, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(logits))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 75, 75, 3))))["params"]
  assert {v.dtype for v in jax.tree_util.tree_leaves(params)} == {
      jnp.dtype(jnp.float32)}


def test_bad_inputs_are_refused():
  model = v4.InceptionV4()
  with pytest.raises(ValueError, match="at least 75x75"):
    model.apply({}, jnp.zeros((1, 74, 74, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    model.apply({}, jnp.zeros((1, 3, 299, 299)))


@pytest.mark.slow
def test_parity_check_entry_point():
  """The check `cxr-jax parity-check` runs: registry dispatch, both sources
  (pretrainedmodels with its 1001 classes), at the smallest size, batch 1
  (test_torch_parity proves 224 and 299)."""
  pytest.importorskip("torch")
  from cxr_jax.parity import inception_v4 as parity
  errors = parity.CHECKS[NAME](sizes=(75,), batch=1, seed=0)
  print(errors)
  assert len(errors) == 4 and max(errors.values()) <= TOLERANCE
