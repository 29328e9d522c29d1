#!/usr/bin/env bash
# Sweep the balancers x seeds of one recipe as Hydra multiruns:
#
#   scripts/sweep_balancers.sh RECIPE [SEEDS] [OVERRIDE...]
#   scripts/sweep_balancers.sh cifar100_resnet56_resnet20_dto_kd 0,1,2,3,4
#   scripts/sweep_balancers.sh cifar100_resnet56_resnet20_kd 0,1 hydra/launcher=submitit_slurm trainer.epochs=10
#
# SEEDS: comma-separated (default 0,1,2,3,4: the cross-batch paper's 5 trials). Everything after the
# seeds is passed to `kdrun train` unchanged (launchers, paths, any key=value).
# BALANCERS (environment): the balancer options to compare (default fixed,dto,cross_batch,mgda,pcgrad).
# Results: multirun/sweep_<RECIPE>/<timestamp>/<balancer>/<job>/ (results.json, metrics.jsonl, tb/), so
#   kdrun tables --table ... multirun/sweep_<RECIPE>   and   kdrun plot multirun/sweep_<RECIPE>/<timestamp>
# work on the whole sweep.
#
# Why a loop over balancers instead of one `-m balancer=a,b,c`: a recipe may set keys of its own
# balancer (e.g. the KD rows' fixed weights alpha_task=0.1, alpha_distill=0.9); Hydra would merge them
# into every other balancer, which rejects them. For each balancer this script asks Hydra which of the
# recipe's balancer keys the other balancer does not take and deletes them (~balancer.KEY). When none
# has to be deleted for any balancer, it is a single multirun.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
RECIPE=$1; shift
SEEDS=0,1,2,3,4
if [[ $# -gt 0 && "$1" =~ ^[0-9]+(,[0-9]+)*$ ]]; then SEEDS=$1; shift; fi
BALANCERS=${BALANCERS:-fixed,dto,cross_batch,mgda,pcgrad}
STAMP=$(date +%Y-%m-%d_%H-%M-%S)
ROOT=multirun/sweep_${RECIPE}/${STAMP}

# For each balancer: the `~balancer.KEY` deletions it needs (one line per balancer: "name del1 del2 ...").
PLAN=$(python - "$RECIPE" "$BALANCERS" <<'PY'
import inspect, sys
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, get_method
from kdrun.cli import config_dir

recipe, balancers = sys.argv[1], sys.argv[2].split(",")
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    own = compose(config_name="config", overrides=[f"+recipe={recipe}"])
    for b in balancers:
        cfg = compose(config_name="config", overrides=[f"+recipe={recipe}", f"balancer={b}"])
        target = cfg.balancer._target_
        try:
            fn = get_class(target).__init__
        except Exception:
            fn = get_method(target)
        params = set(inspect.signature(fn).parameters)
        # Keys that come from the recipe (present in its own balancer) and that this balancer rejects.
        drop = [k for k in cfg.balancer if not k.startswith("_") and k not in params and k in own.balancer]
        print(b, *(f"~balancer.{k}" for k in drop))
PY
)

if ! grep -q '~' <<<"$PLAN"; then
    echo "+ kdrun train -m +recipe=$RECIPE balancer=$BALANCERS seed=$SEEDS $*" >&2
    exec kdrun train -m "+recipe=$RECIPE" "balancer=$BALANCERS" "seed=$SEEDS" \
        "hydra.sweep.dir=$ROOT" "$@"
fi
while read -r B DROPS; do
    # shellcheck disable=SC2086  # DROPS is a space-separated list of overrides
    echo "+ kdrun train -m +recipe=$RECIPE balancer=$B $DROPS seed=$SEEDS $*" >&2
    kdrun train -m "+recipe=$RECIPE" "balancer=$B" $DROPS "seed=$SEEDS" "hydra.sweep.dir=$ROOT/$B" "$@"
done <<<"$PLAN"
