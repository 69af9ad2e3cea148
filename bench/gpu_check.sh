#!/usr/bin/env bash
# GPU verification in one command: the test suite on a CUDA machine, the benchmarks, a short real
# training run of configs/unet3d.yaml on synthetic full-size cases (the loss must fall, validation
# must run, best.pt/last.pt must be written), the same run through a 1-GPU torchrun (DDP), and
# infer.py from the checkpoint (NIfTI masks in the input geometry, with metrics).
#
#   bash bench/gpu_check.sh [STEP ...]       # steps: tests bench train ddp infer (default: all);
#                                            # bench = bench-train bench-infer bench-loader (or one by one)
#   OUT=bench/results/gpu WORK=/tmp/brats_gpu bash bench/gpu_check.sh train infer
#   SMOKE=1 bash bench/gpu_check.sh train ddp infer    # the same steps on the CPU at toy sizes
#
# Each step writes its log / JSON under $OUT (default bench/results/gpu; $WORK/out with SMOKE=1);
# generated data and runs go to $WORK (default /tmp/brats_gpu_check) and are reused by later
# steps. Stops at the first failure. SMOKE=1 runs on the CPU with the demo config and tiny sizes:
# it checks the script, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/brats_gpu_check}
if [ "$SMOKE" = 1 ]; then OUT=${OUT:-$WORK/out}; else OUT=${OUT:-bench/results/gpu}; fi
mkdir -p "$OUT" "$WORK"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests bench train ddp infer)

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    CONFIG=configs/demo.yaml
    DATA_ARGS=(data.root="$WORK/data" data.cache_dir="$WORK/cache" data.synthetic_cases=6 data.folds=3)
    TRAIN_ARGS=(train.epochs=3 train.iters_per_epoch=4 train.val_every=1 train.lr=0.01 train.device=cpu)
else
    DEVICE=cuda
    CONFIG=configs/unet3d.yaml
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
    nvidia-smi >"$OUT/nvidia_smi.txt"
    # 8 full-size cases: 5 train / 3 validate (fold 0 of 3 folds ~ one third held out)
    DATA_ARGS=(data.root="$WORK/data" data.cache_dir="$WORK/cache" data.synthetic_cases=8 data.folds=3)
    TRAIN_ARGS=(train.epochs=4 train.iters_per_epoch=50 train.val_every=1 train.schedule=cosine
                train.warmup_epochs=1 train.lr=0.01)
fi

step() { echo "=== $1 ($(date +%T))"; }

for name in "${STEPS[@]}"; do
    case "$name" in
    tests)
        step "test suite (CUDA tests run when a GPU is visible)"
        python -m pytest -q -rs 2>&1 | tee "$OUT/pytest.log"
        ;;
    bench | bench-train)
        step "benchmark: training step"
        if [ "$SMOKE" = 1 ]; then
            python bench/train_step.py --configs configs/demo.yaml --precisions fp32 --no-estimate \
                --e2e-workers --repeats 1 --no-monai -o "$OUT/train_step.json"
        else  # fp32 / bf16 x channels_last off / on x compile off / on, and the real loader attached
            python bench/train_step.py --device cuda --compile -o "$OUT/train_step_gpu.json"
        fi
        ;;&
    bench | bench-infer)
        step "benchmark: inference"
        if [ "$SMOKE" = 1 ]; then
            python bench/inference.py --shape 64 64 48 --window 32 32 32 --no-tta --repeats 1 --no-monai \
                -o "$OUT/inference.json"
        else  # the default U-Net of configs/unet3d.yaml on a full-size case, bf16, TTA off / on
            python bench/inference.py --device cuda --features 32 64 128 256 320 320 --sw-batch-size 4 \
                --precision bf16 -o "$OUT/inference_gpu.json"
        fi
        ;;&
    bench | bench-loader)
        if [ "$SMOKE" != 1 ]; then
            step "benchmark: loader"
            python bench/loader.py --device cuda --workers 0 4 8 --scenarios full -o "$OUT/loader_gpu.json"
        fi
        ;;&
    bench | bench-train | bench-infer | bench-loader)  # handled above
        ;;
    train)
        step "training run: $CONFIG on synthetic cases ($DEVICE)"
        rm -rf "$WORK/run"
        python train.py -c "$CONFIG" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" out_dir="$WORK/run" \
            2>&1 | tee "$OUT/train.log"
        python bench/check_run.py "$WORK/run" --min-validations 3
        ;;
    ddp)
        step "torchrun, 1 process ($DEVICE)"
        rm -rf "$WORK/run_ddp"
        torchrun --standalone --nproc_per_node 1 train.py -c "$CONFIG" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
            train.epochs=2 out_dir="$WORK/run_ddp" 2>&1 | tee "$OUT/train_ddp.log"
        python bench/check_run.py "$WORK/run_ddp" --min-validations 2 --no-loss-check
        ;;
    infer)
        step "infer.py from $WORK/run/best.pt ($DEVICE, mirror TTA)"
        python infer.py --checkpoint "$WORK/run/best.pt" -i "$WORK/data" -o "$WORK/pred" --overwrite \
            infer.device="$DEVICE" infer.tta=true 2>&1 | tee "$OUT/infer.log"
        python bench/check_run.py "$WORK/run" --predictions "$WORK/pred" --data "$WORK/data"
        ;;
    *)
        echo "unknown step '$name' (steps: tests bench bench-train bench-infer bench-loader train ddp infer)" >&2
        exit 2
        ;;
    esac
done
echo "=== all steps passed: ${STEPS[*]} (logs in $OUT)"
