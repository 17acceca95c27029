#!/usr/bin/env bash
# One host, all of its GPUs (or TPU cores, or CPU): a single process drives
# every local device; the global batch is split over them.
# Assumes: cxr_jax installed in the active Python environment, a prepared
# dataset, and (for transfer rows) converted ImageNet weights.
#
#   launch/local.sh configs/paper.py:table2_cwcel_at WORKDIR [--config.KEY=VALUE ...]
#   DRY_RUN=1 launch/local.sh ...   # print the command only
set -euo pipefail
config=${1:?usage: local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: local.sh CONFIG WORKDIR [overrides...]}
shift 2
cmd=(cxr-jax train --config "$config" --workdir "$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
