"""ChestX-ray14 metadata, splits, the synthetic twin, prepare and the pipeline."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from cxr_jax import cli
from cxr_jax import labels as L
from cxr_jax.data import metadata as M
from cxr_jax.data import pipeline, splits, synthetic, tfds_builder

REAL_COUNTS = {  # the sample README, read from the real CSV
    "Infiltration": 19894, "Effusion": 13317, "Atelectasis": 11559,
    "Nodule": 6331, "Mass": 5782, "Pneumothorax": 5302, "Consolidation": 4667,
    "Pleural Thickening": 3385, "Cardiomegaly": 2776, "Emphysema": 2516,
    "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227,
    "No Finding": 60361}


# ------------------------------------------------------------ real metadata

def test_real_metadata_counts(nih_sample):
  meta = M.read_all(str(nih_sample))
  e = meta.entries
  assert len(e) == 112_120
  assert e.label_counts() == REAL_COUNTS
  assert len(np.unique(e.patient_id)) == 30_805
  assert (e.view == "PA").sum() == 67_310 and (e.view == "AP").sum() == 44_810
  assert not (e.normal & (e.labels.sum(1) > 0)).any()
  assert len(meta.boxes) == 984 and len(set(meta.boxes.names)) == 880
  # 'Infiltrate' in the box list is Infiltration
  assert (meta.boxes.label == L.index("Infiltration")).sum() > 0
  assert len(meta.train_val) == 86_524 and len(meta.test) == 25_596
  assert set(meta.boxes.names) <= set(meta.test)


def test_2017_layout_plain_and_gzipped(tmp_path):
  text = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
          "Patient Gender,View Position,OriginalImage[Width,Height],"
          "OriginalImagePixelSpacing[x,y],\n"
          "00000001_000.png,Cardiomegaly|Pleural_Thickening,0,1,058Y,M,PA,"
          "2682,2749,0.143,0.143,\n"
          "00000002_000.png,No Finding,0,2,006M,F,AP,2500,2048,0.168,0.168,\n")
  plain = tmp_path / "Data_Entry_2017.csv"
  plain.write_text(text)
  gz = tmp_path / "gz" / "Data_Entry_2017.csv.gz"
  gz.parent.mkdir()
  gz.write_bytes(gzip.compress(text.encode()))
  for path in (plain, gz):
    e = M.read_data_entry(str(path))
    assert list(e.names) == ["00000001_000.png", "00000002_000.png"]
    assert e.labels[0, L.index("Cardiomegaly")] == 1
    assert e.labels[0, L.index("Pleural Thickening")] == 1
    assert e.labels[0].sum() == 2 and e.normal.tolist() == [False, True]
    assert e.age[0] == 58 and e.age[1] == pytest.approx(0.5)
    assert e.original_size.tolist() == [[2682, 2749], [2500, 2048]]
  bad = tmp_path / "bad.csv"
  bad.write_text(text.replace("Cardiomegaly|", "Pneumonitis|"))
  with pytest.raises(M.MetadataError, match=r"bad.csv:2.*Pneumonitis"):
    M.read_data_entry(str(bad))
  box = tmp_path / "BBox_List_2017.csv"
  box.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                 "00000001_000.png,Infiltrate,1.5,2,3,4\n")
  b = M.read_bbox_list(str(box))
  assert b.label.tolist() == [L.index("Infiltration")]
  assert b.xywh.tolist() == [[1.5, 2, 3, 4]]


# ------------------------------------------------------------------- splits

def test_splits_on_real_metadata(nih_sample, tmp_path):
  meta = M.read_all(str(nih_sample))
  paper = splits.make_splits(meta, "paper", 0)
  n = len(meta.entries)
  assert [len(paper.train), len(paper.val), len(paper.test)] == [
      round(0.7 * n), round(0.1 * n), n - round(0.7 * n) - round(0.1 * n)]
  summary = splits.summarize(meta.entries, paper)
  assert summary["patients_in_more_than_one_split"] > 1000  # reported leakage
  patient = splits.make_splits(meta, "patient", 0)
  assert splits.summarize(meta.entries,
                          patient)["patients_in_more_than_one_split"] == 0
  official = splits.make_splits(meta, "official", 0)
  assert sorted(official.test) == sorted(meta.test)
  assert splits.summarize(meta.entries,
                          official)["patients_in_more_than_one_split"] == 0
  assert len(official.train) + len(official.val) == len(meta.train_val)
  pa = splits.make_splits(meta, "patient", 0, view="PA")
  assert sum(map(len, pa.as_dict().values())) == 67_310
  assert splits.make_splits(meta, "paper", 1).train != paper.train


def test_split_files_are_byte_identical_for_the_same_seed(nih_sample,
                                                          tmp_path):
  for out in ("a", "b"):
    assert cli.main(["splits", "--data_dir", str(nih_sample), "--scheme",
                     "paper", "--seed", "3", "--out",
                     str(tmp_path / out)]) == 0
  for f in ("train.txt", "val.txt", "test.txt", "summary.json"):
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" /
                                                 f).read_bytes()
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["scheme"] == "paper" and summary["seed"] == 3
  assert set(summary["train"]["positives"]) == set(L.DISEASES)


# ---------------------------------------------------------------- synthetic

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  summary = synthetic.synthesize(str(out), num_images=300, image_size=96,
                                 seed=1, rgba_fraction=0.05, workers=2)
  return out, summary


def test_one_worker_synthesizes_in_process_from_an_unguarded_script(
    synth, tmp_path):
  """`workers=1` makes no pool, so a script with no __main__ guard (here:
  stdin) works, and writes the bytes the pool writes."""
  code = (f"from cxr_jax.data import synthetic\n"
          f"synthetic.synthesize({str(tmp_path)!r}, num_images=300, "
          f"image_size=96, seed=1, rgba_fraction=0.05, workers=1)\n")
  out = subprocess.run([sys.executable, "-"], input=code, text=True,
                       capture_output=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr[-2000:]
  pooled, _ = synth
  for name in ("Data_Entry_2017.csv", "BBox_List_2017.csv",
               "images/00000001_000.png"):
    assert (tmp_path / name).read_bytes() == (pooled / name).read_bytes()


def test_synthetic_layout_and_quirks(synth):
  out, summary = synth
  header = (out / "Data_Entry_2017.csv").read_text().splitlines()[0]
  assert "OriginalImage[Width,Height]" in header and header.endswith(",")
  assert (out / "BBox_List_2017.csv").read_text().startswith(
      "Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
  meta = M.read_all(str(out))
  assert len(meta.entries) == 300
  counts = meta.entries.label_counts()
  assert 0.35 < counts["No Finding"] / 300 < 0.65
  assert "Pleural_Thickening" in (out / "Data_Entry_2017.csv").read_text()
  modes = {Image.open(p).mode for p in (out / "images").iterdir()}
  assert modes == {"L", "RGBA"}
  assert set(meta.boxes.names) <= set(meta.test)
  tv_patients = set(meta.entries.patient_id[np.isin(meta.entries.names,
                                                    meta.train_val)])
  test_patients = set(meta.entries.patient_id[np.isin(meta.entries.names,
                                                      meta.test)])
  assert not tv_patients & test_patients
  p = synthetic.prevalences()
  assert np.argmin(p) == L.index("Hernia")


def test_synthetic_boxes_enclose_the_planted_pattern():
  vector = np.zeros(L.NUM_DISEASES, np.uint8)
  vector[L.index("Mass")] = 1
  with_mass, boxes = synthetic.render(7, vector, 128)
  without, _ = synthetic.render(7, np.zeros_like(vector), 128)
  (label, (x, y, w, h)), = boxes
  assert label == L.index("Mass")
  diff = np.abs(with_mass.astype(int) - without.astype(int))
  inside = diff[int(y):int(y + h), int(x):int(x + w)].sum()
  assert inside / diff.sum() > 0.9


# ------------------------------------------------------------------ prepare

@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory):
  out, _ = synth
  target = tmp_path_factory.mktemp("prepared")
  summary = tfds_builder.prepare(str(out), str(target), image_size=80,
                                 workers=2)
  return str(target), summary


def test_prepare_synthetic(prepared, synth):
  target, summary = prepared
  assert summary["images"] == 300 and summary["missing_skipped"] == 0
  ds = pipeline.PreparedDataset(target)
  meta = M.read_all(target)  # the copies in nih_metadata/
  i = ds.names.index(meta.boxes.names[0])
  rec = ds.record(i)
  assert rec["name"].decode() == meta.boxes.names[0]
  assert rec["image"].shape == (80, 80, 1)
  row = meta.entries.index[ds.names[i]]
  np.testing.assert_array_equal(rec["labels"], meta.entries.labels[row])
  assert len(rec["boxes"]["label"]) >= 1
  assert tuple(rec["source_size"]) == (96, 96)


def _reads_as_tfds(ds) -> None:
  """Every record's image and targets, read from its serialized fields,
  equal TFDS's decoding of the whole record."""
  for i in range(len(ds)):
    image, targets = ds.image_and_labels(i)
    rec = ds.record(i)
    assert image.dtype == np.uint8 and image.shape == rec["image"].shape
    np.testing.assert_array_equal(image, rec["image"])
    np.testing.assert_array_equal(targets, pipeline.labels_with_normal(rec))


def test_fast_reader_is_tfds_decoding(prepared, tmp_path, monkeypatch):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  _reads_as_tfds(ds)
  # Normal films and diseased ones are both there, so the targets differ.
  targets = np.stack([ds.image_and_labels(i)[1] for i in range(len(ds))])
  assert targets[:, L.NUM_DISEASES].any() and targets[:, 0].any()
  # The pipeline reads through it.
  batch = next(iter(pipeline.eval_batches(ds, ds.names[:4], 4, 0, 1,
                                          threads=0)))
  for k, i in enumerate(batch["index"]):
    image, labels = ds.image_and_labels(i)
    np.testing.assert_array_equal(batch["image"][k], image)
    np.testing.assert_array_equal(batch["labels"][k], labels)
  # Without imagecodecs, PIL decodes the same pixels.
  monkeypatch.setitem(sys.modules, "imagecodecs", None)
  _reads_as_tfds(pipeline.PreparedDataset(target))


def test_fast_reader_names_a_record_it_cannot_read(prepared, monkeypatch):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  example = ds._example.FromString(ds._raw[3])
  del example.features.feature["image"]
  raw = {3: example.SerializeToString()}
  monkeypatch.setattr(ds, "_raw", raw)
  with pytest.raises(ValueError, match=rf"record 3 \({ds.names[3]}\) "
                                       r"cannot be read: IndexError"):
    ds.image_and_labels(3)
  example = ds._example.FromString(pipeline.PreparedDataset(target)._raw[3])
  example.features.feature["labels"].int64_list.value.append(1)
  raw[3] = example.SerializeToString()
  with pytest.raises(ValueError, match=r"80x80 image, 15 labels"):
    ds.image_and_labels(3)
  del example.features.feature["labels"]
  raw[3] = example.SerializeToString()
  with pytest.raises(ValueError, match=r"80x80 image, 0 labels"):
    ds.image_and_labels(3)


def _png_row_filters(data: bytes) -> np.ndarray:
  """The filter type of each row of an 8-bit gray, non-interlaced PNG."""
  import struct
  import zlib
  width, height = struct.unpack(">II", data[16:24])
  pos, idat = 8, b""
  while pos < len(data):
    (n,) = struct.unpack(">I", data[pos:pos + 4])
    if data[pos + 4:pos + 8] == b"IDAT":
      idat += data[pos + 8:pos + 8 + n]
    pos += 12 + n
  rows = np.frombuffer(zlib.decompress(idat), np.uint8)
  return rows.reshape(height, width + 1)[:, 0]


def test_level_0_stores_unfiltered_rows_of_the_same_pixels(tmp_path):
  # Rows that PIL's adaptive filter would filter (a gradient plus noise).
  rng = np.random.default_rng(0)
  ramp = np.add.outer(np.arange(64), np.arange(64)) * 2
  pixels = np.clip(ramp + rng.integers(0, 20, (64, 64)), 0, 255)
  images = {f"{i:08d}_000.png": Image.fromarray(
      np.roll(pixels, i, 1).astype(np.uint8), "L") for i in range(3)}
  nih = _mini_nih(tmp_path / "nih", images)
  for level in (0, 1):
    out = str(tmp_path / f"out{level}")
    tfds_builder.prepare(str(nih), out, image_size=64, workers=1,
                         png_compression=level)
    ds = pipeline.PreparedDataset(out)
    for i, name in enumerate(ds.names):
      stored = ds._example.FromString(ds._raw[i]).features.feature[
          "image"].bytes_list.value[0]
      filters = _png_row_filters(stored)
      if level == 0:
        assert not filters.any(), name
      else:
        assert filters.any(), name  # PIL's adaptive filters, smaller files
      np.testing.assert_array_equal(ds.image_and_labels(i)[0][..., 0],
                                    np.asarray(images[name]))
    _reads_as_tfds(ds)


def test_prepare_real_sample_with_allow_missing(nih_sample, tmp_path):
  target = str(tmp_path / "real")
  with pytest.raises(tfds_builder.PrepareError,
                     match=r"112080 of 112120 images .* not on disk"):
    tfds_builder.prepare(str(nih_sample), target, image_size=96, workers=2)
  summary = tfds_builder.prepare(str(nih_sample), target, image_size=96,
                                 allow_missing=True, workers=2)
  assert summary["images"] == 40 and summary["missing_skipped"] == 112_080
  ds = pipeline.PreparedDataset(target)
  assert ds.metadata["num_missing_skipped"] == 112_080
  for name in ("00000100_000.png", "00000574_000.png"):  # RGBA and L
    stored = ds.record(ds.names.index(name))["image"][..., 0].astype(float)
    reference = np.asarray(
        Image.open(nih_sample / "images" / name).convert("L").resize(
            (96, 96), Image.Resampling.LANCZOS), float)
    assert np.abs(stored - reference).mean() < 2.0, name
  boxed = [n for n in ds.names if len(ds.record(ds.names.index(n))[
      "boxes"]["label"])]
  assert len(boxed) == 4  # the sample README: four have boxes
  _reads_as_tfds(ds)  # real films, RGBA and L among them


def _mini_nih(tmp_path, images: dict):
  """An NIH folder whose CSV lists the given images (name -> PIL image)."""
  (tmp_path / "images").mkdir(parents=True)
  rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
          "Patient Gender,View Position,OriginalImage[Width,Height],"
          "OriginalImagePixelSpacing[x,y]"]
  for i, (name, im) in enumerate(sorted(images.items())):
    if im is not None:
      im.save(tmp_path / "images" / name)
    rows.append(f"{name},Mass,0,{i + 1},40,M,PA,100,100,0.1,0.1")
  (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
  return tmp_path


def test_prepare_handles_every_png_mode(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (64, 64)).astype(np.uint8)
  images = {
      "a_l.png": Image.fromarray(gray, "L"),
      "b_rgb.png": Image.fromarray(np.stack([gray] * 3, -1), "RGB"),
      "c_rgba.png": Image.merge("RGBA", [Image.fromarray(gray)] * 3 +
                                [Image.new("L", (64, 64), 255)]),
      "d_16bit.png": Image.fromarray(gray.astype(np.uint16) * 16),
      "e_palette.png": Image.fromarray(gray, "L").convert("P"),
  }
  nih = _mini_nih(tmp_path / "nih", images)
  out = str(tmp_path / "out")
  tfds_builder.prepare(str(nih), out, image_size=64, workers=1)
  ds = pipeline.PreparedDataset(out)
  for name in images:
    img = ds.record(ds.names.index(name))["image"][..., 0].astype(int)
    tol = 1 if name != "d_16bit.png" else 2  # 16-bit is stretched min..max
    expected = gray.astype(int)
    if name == "d_16bit.png":
      lo, hi = gray.min(), gray.max()
      expected = np.round((gray - lo) / (hi - lo) * 255).astype(int)
    assert np.abs(img - expected).max() <= tol, name


def test_prepare_names_bad_files(tmp_path):
  gray = Image.fromarray(np.zeros((32, 32), np.uint8))
  nih = _mini_nih(tmp_path / "nih", {"a.png": gray, "b.png": gray})
  (nih / "images" / "b.png").write_bytes(
      (nih / "images" / "b.png").read_bytes()[:40])
  with pytest.raises(tfds_builder.PrepareError, match=r"b\.png"):
    tfds_builder.prepare(str(nih), str(tmp_path / "out"), image_size=32,
                         workers=1)
  nih2 = _mini_nih(tmp_path / "nih2", {"a.png": gray})
  gray.save(nih2 / "images" / "stray.png")
  summary = tfds_builder.prepare(str(nih2), str(tmp_path / "out2"),
                                 image_size=32, workers=1)
  assert summary["unlisted_on_disk"] == 1 and summary["images"] == 1
  ds = pipeline.PreparedDataset(str(tmp_path / "out2"))
  assert ds.metadata["unlisted_examples"] == ["stray.png"]


def test_prepare_finds_images_in_numbered_subfolders(tmp_path):
  gray = Image.fromarray(np.full((32, 32), 7, np.uint8))
  nih = _mini_nih(tmp_path / "nih", {"a.png": gray, "b.png": None})
  sub = nih / "images_002" / "images"
  sub.mkdir(parents=True)
  gray.save(sub / "b.png")
  assert set(tfds_builder.find_images(str(nih))) == {"a.png", "b.png"}


# ----------------------------------------------------------------- pipeline

def _first_batches(ds, names, seed, n=3, **kw):
  it = iter(pipeline.train_dataset(ds, names, 8, seed, process_index=0,
                                   process_count=1, **kw))
  return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_and_resumable(prepared):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  names = ds.names[:50]
  a = _first_batches(ds, names, seed=4)
  b = _first_batches(ds, names, seed=4)
  c = _first_batches(ds, names, seed=5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  # epochs reshuffle: 50 images, batches of 8 -> the 7th batch is epoch 2
  it = iter(pipeline.train_dataset(ds, names, 10, 4, process_index=0,
                                   process_count=1))
  epoch1 = np.concatenate([next(it)["index"] for _ in range(5)])
  epoch2 = np.concatenate([next(it)["index"] for _ in range(5)])
  assert sorted(epoch1) == sorted(epoch2) and not np.array_equal(epoch1,
                                                                 epoch2)
  state = it.get_state()
  after = next(it)
  resumed = iter(pipeline.train_dataset(ds, names, 10, 4, process_index=0,
                                        process_count=1))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["index"], after["index"])
  x = a[0]
  assert x["image"].dtype == np.uint8 and x["labels"].shape == (8, 15)
  rec = ds.record(int(x["index"][0]))
  assert x["labels"][0, L.NORMAL_INDEX] == float(rec["normal"])


def test_each_epoch_is_a_permutation_and_batches_hold_their_records(
    prepared):
  """The order is a fresh permutation of the split each epoch, cut into
  global batches that straddle epochs; the processes' shares interleave
  into it; each batch holds what its records read, augmented by the
  stream of its position."""
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  names = ds.names[:50]
  split = ds.indices(names)
  shares = [iter(pipeline.train_dataset(ds, names, 8, 3, process_index=p,
                                        process_count=2)) for p in range(2)]
  local = [[next(s) for _ in range(50)] for s in shares]  # 400: 8 epochs
  order = np.empty(400, np.int64)
  for p in range(2):
    order[p::2] = np.concatenate([b["index"] for b in local[p]])
  epochs = order.reshape(8, 50)
  for epoch in epochs:
    assert sorted(epoch) == sorted(split)
  assert len({tuple(e) for e in epochs}) == 8
  for b in local[0][:7]:
    images, labels = ds.images_and_labels(b["index"])
    np.testing.assert_array_equal(b["image"], images)
    np.testing.assert_array_equal(b["labels"], labels)
    assert b["mask"].tolist() == [1.0] * 4
  aug = pipeline.Augment(flip=True, min_crop=0.8)
  augmented = iter(pipeline.train_dataset(ds, names, 8, 3, aug,
                                          process_index=1, process_count=2))
  for b in range(3):
    batch = next(augmented)
    np.testing.assert_array_equal(batch["index"], local[1][b]["index"])
    for k in range(4):
      rng = np.random.Generator(np.random.Philox(key=4, counter=b * 4 + k))
      np.testing.assert_array_equal(batch["image"][k],
                                    aug(local[1][b]["image"][k], rng))
  with pytest.raises(ValueError, match="training split has no images"):
    pipeline.train_dataset(ds, [], 8, 3, process_index=0, process_count=1)


def test_worker_processes_yield_the_same_batches_and_positions(prepared):
  """`loader_workers` decodes in other processes: the same batches, and a
  position saved with any number of workers resumes with any other, and
  the position Grain's own iterator saves (what checkpoints of older runs
  hold) means the same batch number."""
  import grain
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  names = ds.names[:50]
  make = lambda workers: iter(pipeline.train_dataset(
      ds, names, 10, 4, pipeline.Augment(flip=True, min_crop=0.8),
      process_index=0, process_count=1, threads=2, workers=workers))
  alone, pooled = make(0), make(2)
  try:
    want = [next(alone) for _ in range(7)]  # past the first epoch
    got = [next(pooled) for _ in range(4)]
    state = pooled.get_state()
    assert state == {"next_index": 4}
    got += [next(pooled) for _ in range(3)]
    for x, y in zip(want, got):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    alone.set_state(state)  # saved with two workers, resumed with none
    np.testing.assert_array_equal(next(alone)["image"], want[4]["image"])
    pooled.set_state({"next_index": 1})  # and the other way
    np.testing.assert_array_equal(next(pooled)["index"], want[1]["index"])
  finally:
    alone.close()
    pooled.close()
  # The position Grain's plain iterator saves is the one we save.
  batches = pipeline.train_dataset(ds, names, 10, 4, process_index=0,
                                   process_count=1)._batches
  plain = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0)))
  for _ in range(3):
    next(plain)
  resumed = make(0)
  resumed.set_state(plain.get_state())
  np.testing.assert_array_equal(next(resumed)["index"], want[3]["index"])


def test_device_feed_resumes_before_the_batches_it_holds(prepared):
  """Batches placed ahead of their step are not yet trained on: the state
  a checkpoint records is the loader's before the first of them."""
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  names = ds.names[:50]
  make = lambda: iter(pipeline.train_dataset(ds, names, 10, 4,
                                             process_index=0,
                                             process_count=1))
  placed = []
  feed = pipeline.DeviceFeed(make(), lambda b: placed.append(b) or b,
                             depth=2)
  first = feed.peek()
  assert len(placed) == 2 and feed.pop() is first  # peek leaves it queued
  feed.fill()
  second = feed.pop()
  feed.fill()
  assert len(placed) == 4  # two batches wait beyond the two trained on
  resumed = make()
  resumed.set_state(feed.get_state())
  np.testing.assert_array_equal(next(resumed)["index"],
                                feed.pop()["index"])
  assert not np.array_equal(first["index"], second["index"])


def test_process_shares_make_the_global_batch(prepared):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  whole = iter(pipeline.train_dataset(ds, ds.names, 8, 0, process_index=0,
                                      process_count=1))
  shares = [iter(pipeline.train_dataset(ds, ds.names, 8, 0, process_index=p,
                                        process_count=2)) for p in range(2)]
  for _ in range(3):
    g = next(whole)["index"]
    local = [next(s)["index"] for s in shares]
    assert all(len(x) == 4 for x in local)
    assert sorted(np.concatenate(local)) == sorted(g)


def test_eval_batches_pad_and_cover_once(prepared):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  names = ds.names[:21]
  batches = list(pipeline.eval_batches(ds, names, 8, 0, 1))
  assert len(batches) == 3
  seen = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(seen, ds.indices(names))
  with pytest.raises(KeyError, match="1 of 2 images"):
    ds.indices([ds.names[0], "nope.png"])


def test_augmentation_is_seeded_and_keeps_shape(prepared):
  target, _ = prepared
  ds = pipeline.PreparedDataset(target)
  aug = pipeline.Augment(flip=True, min_crop=0.85)
  a = _first_batches(ds, ds.names, 2, n=1, augment=aug)[0]
  b = _first_batches(ds, ds.names, 2, n=1, augment=aug)[0]
  plain = _first_batches(ds, ds.names, 2, n=1)[0]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == plain["image"].shape
  assert not np.array_equal(a["image"], plain["image"])


def test_model_input_is_three_channels_in_minus_one_one():
  import jax.numpy as jnp
  x = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)
  dev = np.asarray(pipeline.to_model_input(jnp.asarray(x)))
  host = np.repeat(x.astype(np.float32) / 127.5 - 1.0, 3, axis=-1)
  assert dev.shape == (1, 1, 3, 3)
  np.testing.assert_allclose(dev[0, 0, :, 0], [-1, 128 / 127.5 - 1, 1],
                             atol=1e-6)
  np.testing.assert_allclose(dev, host, atol=1e-6)


def test_cli_synth_and_prepare(tmp_path, capsys):
  assert cli.main(["synth", "--out", str(tmp_path / "s"), "--num_images",
                   "40", "--image_size", "80"]) == 0
  assert cli.main(["prepare", "--data_dir", str(tmp_path / "s"), "--out",
                   str(tmp_path / "p"), "--image_size", "75",
                   "--workers", "1"]) == 0
  assert cli.main(["splits", "--data_dir", str(tmp_path / "p"), "--scheme",
                   "official", "--out", str(tmp_path / "sp")]) == 0
  out = capsys.readouterr().out
  assert "prepared 40 images at 75px" in out
  assert (tmp_path / "sp" / "test.txt").exists()
  assert cli.main(["prepare", "--data_dir", str(tmp_path / "nothing"),
                   "--out", str(tmp_path / "p2")]) == 2
