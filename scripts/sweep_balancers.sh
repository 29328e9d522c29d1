#!/usr/bin/env bash
# Sweep balancers x seeds on one recipe: a shorthand for the Hydra multirun
#
#   kdrun train -m +recipe=RECIPE balancer=$BALANCERS seed=SEEDS hydra.sweep.dir=multirun/sweep_RECIPE/<time> ...
#
#   scripts/sweep_balancers.sh RECIPE [SEEDS] [OVERRIDE...]
#   scripts/sweep_balancers.sh cifar100_resnet56_resnet20_kd 0,1,2,3,4
#   scripts/sweep_balancers.sh cifar100_resnet56_resnet20_kd 0,1 hydra/launcher=slurm trainer.epochs=10
#
# SEEDS: comma-separated (default 0,1,2,3,4: the cross-batch paper's 5 trials). Everything after the seeds
# goes to `kdrun train` unchanged. BALANCERS (environment): the options of conf/balancer/ to compare
# (default fixed,dto,cross_batch,mgda,pcgrad; a recipe's own weighting may be a named option, e.g. the KD
# rows' fixed_kd). Job directories are <n>_<balancer>_seed<seed> (conf/config.yaml hydra.sweep.subdir), so
#   kdrun tables --table ... multirun/sweep_RECIPE   and   kdrun plot multirun/sweep_RECIPE/<time>
# work on the whole sweep.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
RECIPE=$1; shift
SEEDS=0,1,2,3,4
if [[ $# -gt 0 && "$1" =~ ^[0-9]+(,[0-9]+)*$ ]]; then SEEDS=$1; shift; fi
BALANCERS=${BALANCERS:-fixed,dto,cross_batch,mgda,pcgrad}
set -x
exec kdrun train -m "+recipe=$RECIPE" "balancer=$BALANCERS" "seed=$SEEDS" \
    "hydra.sweep.dir=multirun/sweep_${RECIPE}/$(date +%Y-%m-%d_%H-%M-%S)" "$@"
