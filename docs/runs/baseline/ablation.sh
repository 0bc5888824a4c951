#!/usr/bin/env bash
# What moves the toy baseline: each recipe switch alone on seeds 0 and 1, to convergence with the
# paper's patience (50 epochs), two runs side by side (one lane per seed). Resumable: rerun the
# same command (a finished run is only re-evaluated).
#
# The switches that change only when a run stops and which epoch it reports (what early stopping
# watches, which weights it keeps) need no run of their own: 'recorded' is the default recipe
# with the test split evaluated after every epoch, and
#   python -m train.analyze selection --workdir workdirs/baseline/selection \
#       --runs workdirs/baseline/recorded/0,workdirs/baseline/recorded/1
# replays every rule on its trajectory, exactly as a run with that rule would have stopped and
# kept (val_loss, restore_last and keras_stopping stay here as runs, to check a replay).
# jpeg_q50 is not a Keras switch but a probe of what the data's compression costs: the copy
# re-encoded at JPEG quality 50 (docs/runs/baseline/jpeg_distortion.py measures how far that is).
# dropout_dense1 reads the text's "0.2 drop-out as regularization" as one dropout layer, after the
# hidden dense layer, instead of one after each pooling (model.dropout_after has the other readings).
# dropout_dense1_test_selected combines the two switches that moved the test accuracy up on their
# own: dropout after the dense layer, and the Keras habit of training on all 50,000 images and
# selecting on the test set (so it, too, is selected on the test set). It runs on seed 2 as well:
#   SEEDS=2 bash docs/runs/baseline/ablation.sh workdirs/baseline dropout_dense1_test_selected
#
# On a GPU, SWEEP=1 trains each variant as one backbone sweep over the seeds instead, one variant
# after another (SEEDS defaults to "0 1 2" there; members/<i> are plain workdirs with their own
# history.jsonl, which train.analyze selection and table.py read):
#   SWEEP=1 bash docs/runs/baseline/ablation.sh workdirs/baseline_sweep
#   python docs/runs/baseline/table.py workdirs/baseline_sweep
# SNAPSHOT=1 trains nothing: it copies each unfinished run's config.json and history.jsonl to the
# same place (its history so far, which a rerun from the start reproduces epoch for epoch), so
# the table can show where a run stands even if its workdir is lost.
# EXTRA adds flags to every run (a quick check: EXTRA="--config.backbone_training.num_epochs=1").
#
# Needs the CIFAR-10 JPEG copy prepared:
#   python -m train.prepare_data --source path/to/cifar10-jpeg.tar.xz --name local_cifar10 \
#       --data_dir data/tfds
# Usage: bash docs/runs/baseline/ablation.sh [workdir root, default workdirs/baseline] [variant...]
# (SEEDS="0 1 2" for other lanes; the default is "0 1").
# Runs can also be queued, two at a time, each starting as soon as a slot frees (a lane per seed
# leaves a slot idle when one seed stops early):
#   printf '%s\n' '0 dropout_dense1_test_selected' '1 dropout_dense1_test_selected' \
#       '2 dropout_dense1_test_selected' '0 jpeg_q50' '1 jpeg_q50' '0 pixels_255' '1 pixels_255' |
#     xargs -P 2 -L 1 sh -c 'SEEDS=$0 bash docs/runs/baseline/ablation.sh workdirs/baseline $1'
# The default recipe's runs are the shipped backbones (pretrained/toy_cifar10_s{0,1,2}/backbone).
set -uo pipefail
cd "$(dirname "$0")/../../.."
root=${1:-workdirs/baseline}
shift || true
python=${PYTHON:-.venv/bin/python}
# Where each finished run's config, results, elapsed time and history are copied (the table
# reads them there); only for the default root unless COPIES names a folder.
copies=${COPIES-}
[ "$root" = workdirs/baseline ] && copies=${COPIES:-docs/runs/baseline}

declare -A FLAGS=(
  [recorded]="--config.backbone_training.test_each_epoch=true"
  [test_selected]="--config.dataset.validation=test"
  [keras_init]="--config.model.kernel_init=keras"
  [val_loss]="--config.backbone_training.monitor=val_loss"
  [restore_last]="--config.backbone_training.restore=last"
  [keras_stopping]="--config.backbone_training.monitor=val_loss --config.backbone_training.restore=last"
  [pixels_255]="--config.model.pixel_scale=255"
  [jpeg_q50]="--config.dataset.jpeg_quality=50"
  [dropout_dense1]="--config.model.dropout_after=dense1"
  [dropout_dense1_test_selected]="--config.model.dropout_after=dense1 --config.dataset.validation=test"
)
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(test_selected recorded dropout_dense1 keras_init dropout_dense1_test_selected jpeg_q50 pixels_255)

lane() {  # the variants in order, on one seed
  local seed=$1
  for v in "${variants[@]}"; do
    local w="$root/$v/$seed"
    mkdir -p "$w"
    echo "[ablation] $(date -u +%FT%TZ) $v seed $seed -> $w"
    # shellcheck disable=SC2086
    "$python" -m train.main --config configs/toy_cifar10.py --workdir "$w" \
      --config.stage=backbone --config.dataset.data_dir=data/tfds --config.seed="$seed" \
      ${FLAGS[$v]} ${EXTRA:-} >> "$w/train.log" 2>&1 || echo "[ablation] $v seed $seed failed: $w/train.log"
    # a finished run's record, to commit (once: rerunning re-evaluates it, changing nothing else)
    if [ -n "$copies" ] && [ -f "$w/results.json" ] && [ ! -f "$copies/$v/$seed/results.json" ]; then
      mkdir -p "$copies/$v/$seed"
      cp "$w"/{config,results,elapsed}.json "$w/history.jsonl" "$copies/$v/$seed/"
    fi
  done
}

sweeps() {  # each variant as one sweep over the seeds, one variant after another
  local seeds
  seeds="($(echo "${SEEDS:-0 1 2}" | tr -s ' ' ','),)"
  for v in "${variants[@]}"; do
    local w="$root/$v"
    mkdir -p "$w"
    echo "[ablation] $(date -u +%FT%TZ) $v seeds $seeds -> $w"
    # shellcheck disable=SC2086
    "$python" -m train.main --config configs/toy_cifar10.py --workdir "$w" \
      --config.stage=backbone --config.dataset.data_dir=data/tfds --config.sweep.seeds="$seeds" \
      ${FLAGS[$v]} ${EXTRA:-} >> "$w/train.log" 2>&1 || echo "[ablation] $v failed: $w/train.log"
  done
}

snapshot() {  # each unfinished run's history so far, where finished runs are copied
  for seed in ${SEEDS:-0 1}; do
    for v in "${variants[@]}"; do
      local w="$root/$v/$seed"
      if [ -f "$w/history.jsonl" ] && [ ! -f "$w/results.json" ]; then
        mkdir -p "$copies/$v/$seed"
        cp "$w/config.json" "$w/history.jsonl" "$copies/$v/$seed/"
        echo "[ablation] $v seed $seed: $(wc -l < "$w/history.jsonl") epochs so far"
      fi
    done
  done
}

if [ -n "${SNAPSHOT:-}" ]; then
  [ -n "$copies" ] || { echo "SNAPSHOT=1 needs the default root or COPIES=folder" >&2; exit 2; }
  snapshot
  exit 0
elif [ -n "${SWEEP:-}" ]; then
  sweeps
else
  for seed in ${SEEDS:-0 1}; do
    lane "$seed" &
  done
  wait
fi
echo "[ablation] $(date -u +%FT%TZ) done"
