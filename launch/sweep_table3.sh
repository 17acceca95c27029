#!/usr/bin/env bash
# Table 3: CW-CEL(AT) on six random 70/10/20 splits (trials = seeds 0-5),
# one run after another on this host, then evaluation and the mean +- sd
# table (`cxr-jax compare` once evaluation lands).
# Assumes: a prepared dataset and converted ImageNet weights.
#
#   launch/sweep_table3.sh DATA imagenet.npz ROOT_WORKDIR [overrides...]
#   DRY_RUN=1 launch/sweep_table3.sh ...   # print the commands only
set -euo pipefail
data=${1:?usage: sweep_table3.sh DATA WEIGHTS ROOT [overrides...]}
weights=${2:?}; root=${3:?}
shift 3
here=$(cd "$(dirname "$0")" && pwd)
for trial in 0 1 2 3 4 5; do
  cmd=("$here/local.sh" "$here/../configs/paper.py:table2_cwcel_at"
       "$root/trial_$trial" "--config.data_dir=$data"
       "--config.init_weights=$weights" "--config.split_scheme=paper"
       "--config.split_seed=$trial" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; continue; fi
  "${cmd[@]}"
done
