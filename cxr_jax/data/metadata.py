"""Reading the NIH ChestX-ray14 metadata files. Nothing else parses them.

Quirks of the real files, all handled here:

* `Data_Entry_2017.csv`'s header splits into more fields than its names,
  because `OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]`
  contain commas; the 2017 release also ends every line with a trailing comma
  (an empty column). Columns are therefore read by position after checking
  the header's first seven names.
* `Finding Labels` joins labels with `|`; `No Finding` stands alone and is the
  "normal" flag. Disease spellings go through `cxr_jax.labels.canonical`
  (`Pleural_Thickening`).
* Ages are numbers in the v2020 revision and `058Y`-style strings (Y/M/D) in
  the 2017 one.
* `BBox_List_2017.csv` spells Infiltration `Infiltrate`, has the header
  `Image Index,Finding Label,Bbox [x,y,w,h],,,` and boxes in 1024-px
  coordinates.

Files may be plain or gzipped (detected from their first bytes). Whatever
is wrong with one (bad bytes, a truncated gzip, a malformed row, an image
listed twice) is a MetadataError naming the file, and the line where there
is one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import math
import os
import zlib
from typing import Iterable

import numpy as np

from cxr_jax import labels as L

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
_FIRST_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                  "Patient Age", "Patient Gender", "View Position")


class MetadataError(ValueError):
  """A metadata file that does not parse; the message names file and line."""


def open_text(path: str) -> io.TextIOBase:
  """Opens a plain or gzipped text file (by its magic bytes)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"metadata file not found: {path}")
  with open(path, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  return (gzip.open(path, "rt", newline="") if gz else
          open(path, "r", newline=""))


@contextlib.contextmanager
def _reading(path: str):
  """`open_text(path)`, with the errors of its bytes (encoding, gzip, csv
  syntax) raised as a MetadataError naming the file."""
  f = open_text(path)
  try:
    with f:
      yield f
  except (UnicodeDecodeError, csv.Error, EOFError, zlib.error, OSError) as e:
    raise MetadataError(f"{path} is not a readable text file: "
                        f"{type(e).__name__}: {e}") from None


def find_file(directory: str, names: Iterable[str]) -> str:
  """The first of `names` (or its .gz) that exists in `directory`."""
  for name in names:
    for candidate in (name, name + ".gz"):
      path = os.path.join(directory, candidate)
      if os.path.exists(path):
        return path
  raise FileNotFoundError(f"none of {list(names)} (plain or .gz) in "
                          f"{directory}")


def _rows(reader, path: str):
  """(where, row) for each non-empty row, trailing empty fields dropped."""
  for line_no, row in enumerate(reader, start=2):
    while row and not row[-1].strip():
      row.pop()
    if row:
      yield f"{path}:{line_no}", row


def _age_years(text: str, where: str) -> float:
  text = text.strip()
  if not text:
    return float("nan")
  unit = text[-1].upper()
  if unit in "YMD":
    scale = {"Y": 1.0, "M": 1 / 12, "D": 1 / 365.25}[unit]
    text = text[:-1]
  else:
    scale = 1.0
  try:
    return float(text) * scale
  except ValueError:
    raise MetadataError(f"{where}: Patient Age {text!r} is not a number")
  except OverflowError:
    raise MetadataError(f"{where}: Patient Age {text!r} is out of range")


@dataclasses.dataclass
class Entries:
  """One row per image of Data_Entry_2017.csv, as columns."""

  names: np.ndarray          # [n] str, e.g. '00000001_000.png'
  labels: np.ndarray         # [n, 14] uint8, cxr_jax.labels.DISEASES order
  normal: np.ndarray         # [n] bool, 'No Finding'
  patient_id: np.ndarray     # [n] int64
  follow_up: np.ndarray      # [n] int64
  age: np.ndarray            # [n] float32 years (NaN if missing)
  sex: np.ndarray            # [n] str 'M'/'F'
  view: np.ndarray           # [n] str 'PA'/'AP'
  original_size: np.ndarray  # [n, 2] int64 (width, height) of the original
  source: str = ""

  def __len__(self) -> int:
    return len(self.names)

  @property
  def index(self) -> dict[str, int]:
    """name -> row."""
    return {n: i for i, n in enumerate(self.names)}

  def select(self, rows) -> "Entries":
    fields = {f.name: getattr(self, f.name)[rows]
              for f in dataclasses.fields(self) if f.name != "source"}
    return Entries(**fields, source=self.source)

  def label_counts(self) -> dict[str, int]:
    counts = dict(zip(L.DISEASES, self.labels.sum(0).tolist()))
    counts[L.NO_FINDING] = int(self.normal.sum())
    return counts


def read_data_entry(path: str) -> Entries:
  """Reads Data_Entry_2017.csv (2017 or v2020 revision, plain or gzipped)."""
  names, labels, normal, pid, follow, age, sex, view, size = ([] for _ in
                                                              range(9))
  first_line: dict[str, str] = {}
  repeated: list[str] = []
  with _reading(path) as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration:
      raise MetadataError(f"{path} is empty") from None
    while header and not header[-1].strip():  # trailing empty columns
      header.pop()
    if tuple(h.strip() for h in header[:7]) != _FIRST_COLUMNS:
      raise MetadataError(
          f"{path}: header does not start with {list(_FIRST_COLUMNS)}; got "
          f"{header[:7]}")
    for where, row in _rows(reader, path):
      if len(row) < 9:
        raise MetadataError(f"{where}: expected at least 9 fields, got "
                            f"{len(row)}: {row}")
      findings = [x.strip() for x in row[1].split("|") if x.strip()]
      vector = np.zeros(L.NUM_DISEASES, np.uint8)
      is_normal = findings == [L.NO_FINDING]
      if not is_normal:
        for finding in findings:
          try:
            vector[L.index(finding)] = 1
          except KeyError as e:
            raise MetadataError(f"{where}: {e.args[0]}") from None
      name = row[0].strip()
      if not name:
        raise MetadataError(f"{where}: empty Image Index")
      if name in first_line:
        repeated.append(f"{name} ({first_line[name]} and {where})")
      first_line.setdefault(name, where)
      try:
        names.append(name)
        labels.append(vector)
        normal.append(is_normal)
        follow.append(int(row[2]))
        pid.append(int(row[3]))
        age.append(_age_years(row[4], where))
        sex.append(row[5].strip())
        view.append(row[6].strip())
        size.append((int(float(row[7])), int(float(row[8]))))
      except (ValueError, OverflowError) as e:
        raise MetadataError(f"{where}: {e}") from None
  if not names:
    raise MetadataError(f"{path} has a header but no rows")
  if repeated:
    # The last row would silently win, and the image could land in two
    # splits.
    raise MetadataError(
        f"{path}: {len(repeated)} images are listed more than once, each "
        f"must have one row (first: {'; '.join(repeated[:5])})")
  return Entries(
      names=np.array(names), labels=np.stack(labels), normal=np.array(normal),
      patient_id=np.array(pid, np.int64), follow_up=np.array(follow, np.int64),
      age=np.array(age, np.float32), sex=np.array(sex), view=np.array(view),
      original_size=np.array(size, np.int64), source=path)


@dataclasses.dataclass
class Boxes:
  """One row per box of BBox_List_2017.csv, coordinates in 1024-px pixels."""

  names: np.ndarray   # [m] str
  label: np.ndarray   # [m] int32 index into cxr_jax.labels.DISEASES
  xywh: np.ndarray    # [m, 4] float32 x, y, width, height (1024-px image)

  def __len__(self) -> int:
    return len(self.names)

  def for_image(self) -> dict[str, list[tuple[int, np.ndarray]]]:
    """name -> [(label index, xywh), ...]."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for n, lab, box in zip(self.names, self.label, self.xywh):
      out.setdefault(str(n), []).append((int(lab), box))
    return out


def read_bbox_list(path: str) -> Boxes:
  """Reads BBox_List_2017.csv (plain or gzipped)."""
  names, label, xywh = [], [], []
  with _reading(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header or header[0].strip() != "Image Index":
      raise MetadataError(f"{path}: expected a header starting with "
                          f"'Image Index', got {header}")
    for where, row in _rows(reader, path):
      if len(row) != 6:
        raise MetadataError(f"{where}: expected 6 fields (name, label, x, y, "
                            f"w, h), got {len(row)}: {row}")
      try:
        box = [float(v) for v in row[2:6]]
        if not all(map(math.isfinite, box)):
          raise ValueError(f"box {row[2:6]} is not finite")
        label.append(L.index(row[1]))
        xywh.append(box)
      except KeyError as e:
        raise MetadataError(f"{where}: {e.args[0]}") from None
      except ValueError as e:
        raise MetadataError(f"{where}: {e}") from None
      names.append(row[0].strip())
  return Boxes(np.array(names), np.array(label, np.int32),
               np.array(xywh, np.float32).reshape(-1, 4))


def read_list(path: str) -> list[str]:
  """Reads train_val_list.txt / test_list.txt (one image name per line)."""
  with _reading(path) as f:
    return [line.strip() for line in f if line.strip()]


@dataclasses.dataclass
class NIHMetadata:
  """Everything the NIH release says about its images."""

  entries: Entries
  boxes: Boxes | None
  train_val: list[str] | None
  test: list[str] | None


# Where a prepared dataset keeps its copies of the NIH metadata files.
METADATA_DIR = "nih_metadata"
# The metadata files, each a group of alternative names: Data_Entry first.
METADATA_FILES = (DATA_ENTRY_NAMES, (BBOX_NAME,), (TRAIN_VAL_LIST,),
                  (TEST_LIST,))


def metadata_files(directory: str) -> list[str]:
  """The metadata files present in `directory` (plain or .gz)."""
  found = []
  for names in METADATA_FILES:
    try:
      found.append(find_file(directory, names))
    except FileNotFoundError:
      continue
  return found


def digests(directory: str) -> dict[str, str]:
  """File name -> SHA-256 of each metadata file in `directory`: what a
  prepared dataset records of its source, and checks its copies against."""
  out = {}
  for path in metadata_files(directory):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        sha.update(block)
    out[os.path.basename(path)] = sha.hexdigest()
  return out


def read_all(directory: str) -> NIHMetadata:
  """Reads the metadata files of an NIH folder, or of a prepared dataset,
  which keeps copies of them in METADATA_DIR."""
  copies = os.path.join(directory, METADATA_DIR)
  if os.path.isdir(copies):
    directory = copies
  entries = read_data_entry(find_file(directory, DATA_ENTRY_NAMES))

  def optional(reader, name):
    try:
      return reader(find_file(directory, [name]))
    except FileNotFoundError:
      return None

  return NIHMetadata(entries, optional(read_bbox_list, BBOX_NAME),
                     optional(read_list, TRAIN_VAL_LIST),
                     optional(read_list, TEST_LIST))
