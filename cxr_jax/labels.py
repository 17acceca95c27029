"""The one home of label names and their order.

Every other module imports from here, so the order of the model's outputs,
the columns of the metrics and the CSV spellings can never drift apart.
"""

from __future__ import annotations

# The paper's table order (Xu et al. 2018, Tables 1-6). The model's output i is
# DISEASES[i]; the 15th output (index NORMAL_INDEX) is the auxiliary "normal"
# task, which is trained but never evaluated.
DISEASES: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Effusion",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pneumonia",
  "Pneumothorax",
  "Consolidation",
  "Edema",
  "Emphysema",
  "Fibrosis",
  "Pleural Thickening",
  "Hernia",
)
NUM_DISEASES = len(DISEASES)
NORMAL = "Normal"
NORMAL_INDEX = NUM_DISEASES
OUTPUTS: tuple[str, ...] = DISEASES + (NORMAL,)
NUM_OUTPUTS = len(OUTPUTS)

# How the NIH files spell things. `Data_Entry_2017.csv` writes
# `Pleural_Thickening`; `BBox_List_2017.csv` writes `Infiltrate` for
# Infiltration. `No Finding` stands alone and means the normal flag.
NO_FINDING = "No Finding"
_CSV_SPELLINGS = {
  "Pleural_Thickening": "Pleural Thickening",
  "Infiltrate": "Infiltration",
}
INDEX = {name: i for i, name in enumerate(DISEASES)}


def canonical(name: str) -> str:
  """Maps any NIH spelling of a disease to the name in DISEASES."""
  name = name.strip()
  name = _CSV_SPELLINGS.get(name, name)
  if name not in INDEX:
    raise KeyError(
        f"unknown finding label {name!r}; expected one of {list(DISEASES)} "
        f"or {NO_FINDING!r}")
  return name


def index(name: str) -> int:
  """The output index of a disease, whatever its NIH spelling."""
  return INDEX[canonical(name)]


def csv_spelling(name: str) -> str:
  """How Data_Entry_2017.csv writes a disease (for the synthetic twin)."""
  return "Pleural_Thickening" if name == "Pleural Thickening" else name
