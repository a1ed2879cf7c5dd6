#!/usr/bin/env bash
# Whole validation study, from scratch, in one command (run from anywhere):
#
#     bash experiments/xtb_aspirin/run.sh
#
# 1. split the shared GFN2-xTB aspirin trajectory (500 K, 20k frames) into 1k/10k splits
#    (without /work/shared: generate XTB_FRAMES frames of xTB MD instead, needs tblite);
# 2. pretrain SchNet on the 1k split (configs/pretrain.yml);
# 3. StABlE-train it (configs/train.yml);
# 4. evaluate the pretrained and the StABlE model with the same Langevin simulations
#    (configs/simulate.yml);
# 5. in parallel with 2-4: the same evaluation of the original's published SchNet aspirin
#    checkpoints (pretrained and StABlE; DFT MD17-trained), if /work/shared holds them;
# 6. report.py: table, figures, VALIDATION.md numbers.
# Everything large goes to experiments/xtb_aspirin/out/ (git-ignored).  Rerunning reuses what
# exists (data, checkpoints, finished training/evaluations); `rm -rf experiments/xtb_aspirin/out`
# starts over.  Per-stage wall times are appended to out/timings.tsv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."                       # repository root: all config paths are relative to it
[ -f .venv/bin/activate ] && . .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
E=experiments/xtb_aspirin
OUT=$E/out
CFG=$E/configs
RAW=${RAW:-/work/shared/data/xtb_aspirin_500K.npz}
ORIG=${ORIG:-/work/shared/reference/original_stable_checkpoints}
XTB_FRAMES=${XTB_FRAMES:-20000}
mkdir -p "$OUT/logs"
TIMES=$OUT/timings.tsv

stage() {  # stage NAME LOGFILE CMD...  — run, log, record wall time
    local name=$1 log=$2; shift 2
    local t0; t0=$(date +%s)
    echo "[$(date +%T)] $name: $*" | tee -a "$OUT/logs/commands.log"
    if "$@" > "$log" 2>&1; then
        printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$(date -Is)" >> "$TIMES"
        echo "[$(date +%T)] $name done in $(( $(date +%s) - t0 )) s"
    else
        echo "[$(date +%T)] $name FAILED (see $log)"; tail -n 20 "$log"; return 1
    fi
}

T_START=$(date +%s)
echo "study started $(date -Is)" >> "$TIMES"

# ---- 1. data
if [ ! -f "$OUT/data/xtb/aspirin/1k/test/data.npz" ]; then
    if [ -f "$RAW" ]; then
        stage data "$OUT/logs/data.log" python download_stable_paper_data.py --dataset xtb --molecule aspirin \
            --raw "$RAW" --data-dir "$OUT/data" --no-progress
    else
        stage data "$OUT/logs/data.log" python download_stable_paper_data.py --dataset xtb --molecule aspirin \
            --frames "$XTB_FRAMES" --temperature 500 --data-dir "$OUT/data" --no-progress
    fi
fi

# ---- 5. the original's checkpoints (background stream; independent of our training)
SIM_ORIG=(python stable_training.py --config-yml "$CFG/simulate_original.yml")
original_stream() {
    for which in pretrained:schnet_aspirin_1k_pretrained/best_checkpoint.pt stable:schnet_aspirin_1k_stable/ckpt.pt; do
        local tag=${which%%:*} src=$ORIG/${which#*:}
        local ck=$OUT/original_checkpoints/$tag.pt
        if compgen -G "$OUT/stable_runs/schnet_aspirin_original_${tag}_*/inference/pre/final_metrics.json" > /dev/null; then continue; fi
        [ -f "$ck" ] || python "$E/convert_original.py" "$src" "$ck" >> "$OUT/logs/convert_original.log" 2>&1
        stage "eval_original_$tag" "$OUT/logs/eval_original_$tag.log" "${SIM_ORIG[@]}" \
            --set exp_name=original_$tag --set pretrained_checkpoint="$ck"
    done
}
BG=""
if [ -d "$ORIG" ]; then
    original_stream & BG=$!
else
    echo "no $ORIG: skipping the original's checkpoints"
fi

# ---- 2. pretraining
PRE_CK=$OUT/MODELPATH/xtb-aspirin_1k_schnet/checkpoints/best_checkpoint.pt
if [ ! -f "$OUT/MODELPATH/xtb-aspirin_1k_schnet/.done" ]; then
    stage pretrain "$OUT/logs/pretrain.log" python pretraining.py --mode train --config-yml "$CFG/pretrain.yml"
    touch "$OUT/MODELPATH/xtb-aspirin_1k_schnet/.done"
fi

# ---- 3. StABlE training (resumes if interrupted; finished runs return at once)
if [ ! -f "$OUT/stable_runs/.ours_trained" ]; then
    stage stable_train "$OUT/logs/stable_train.log" python stable_training.py --config-yml "$CFG/train.yml"
    touch "$OUT/stable_runs/.ours_trained"
fi

# ---- 4. evaluation of ours: pretrained (pre) and StABlE (post), side by side (1 thread each)
EV=()
for em in pre post; do
    if ! compgen -G "$OUT/stable_runs/schnet_aspirin_ours_*/inference/$em/final_metrics.json" > /dev/null; then
        stage "eval_ours_$em" "$OUT/logs/eval_ours_$em.log" python stable_training.py \
            --config-yml "$CFG/simulate.yml" --eval_model "$em" & EV+=($!)
    fi
done
for p in "${EV[@]}"; do wait "$p"; done

[ -n "$BG" ] && wait "$BG"
printf 'total\t%s\t%s\n' "$(( $(date +%s) - T_START ))" "$(date -Is)" >> "$TIMES"

# ---- 6. report
stage report "$OUT/logs/report.log" python "$E/report.py"
cat "$OUT/logs/report.log"
