#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker
# (gcloud ... ssh --worker=all); JAX detects the TPU topology itself.
# Assumes: the TPU VM exists, the repo is cloned at ~/cxr_jax on every worker
# with cxr_jax installed (pip install -e ~/cxr_jax), and DATA / WORKDIR are on
# a filesystem every worker reads (e.g. a mounted bucket).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/paper.py:table2_cwcel_at WORKDIR [overrides]
#   DRY_RUN=1 launch/tpu_vm.sh ...   # print the command only
set -euo pipefail
tpu=${1:?usage: tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?}; config=${3:?}; workdir=${4:?}
shift 4
remote="cd ~/cxr_jax && cxr-jax train --distributed_auto --config $config --workdir $workdir $*"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all
     --command "$remote")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
