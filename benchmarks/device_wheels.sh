#!/usr/bin/env bash
# Run HERE, where PyPI answers, before a session that has a GPU machine lent:
# downloads into .whl/ (git-ignored) the Python 3.12 wheels that the GPU
# image lacks, so that benchmarks/device.sh can install them there with no
# network. The GPU image has jax, flax, optax, orbax, numpy, pillow, tqdm,
# h5py, protobuf, pyarrow, etils and absl; the pins are this project's
# tested versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux2014 \
           manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  ml_collections==1.1.0 \
  tensorflow-datasets==4.9.10 dm-tree==0.1.10 simple-parsing==0.1.9 \
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 \
  immutabledict==4.3.1 importlib_resources==7.1.0 \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 \
  imagecodecs==2026.3.6 tensorboardX==2.6.5 pydicom==3.0.2
# promise is published as a source archive only; it is pure Python, so its
# wheel built here installs anywhere.
"$PY" -m pip wheel -q --no-deps -w .whl promise==2.3
ls .whl
du -sh .whl
