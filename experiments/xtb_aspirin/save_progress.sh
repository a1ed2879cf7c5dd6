#!/usr/bin/env bash
# Copy the resume files of the study's unfinished long stages (QM pretraining, StABlE training,
# evaluations) from the git-ignored out/ into
# experiments/xtb_aspirin/resume/<stage>/ so that they can be committed: a later session on a
# fresh machine then continues them (run.sh restores them into out/) instead of starting over.
# Finished stages need nothing here: run.sh exports their final checkpoints to checkpoints/.
#
#     bash experiments/xtb_aspirin/save_progress.sh && git add experiments/xtb_aspirin/resume
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/../.."
E=experiments/xtb_aspirin
OUT=$E/out
save() {  # save NAME SRC_DIR FILE...
    local name=$1 src=$2; shift 2
    [ -f "$OUT/done/$name" ] && { rm -rf "$E/resume/$name"; return 0; }  # finished: nothing to keep
    [ -d "$src" ] || return 0
    mkdir -p "$E/resume/$name"
    for f in "$@"; do [ -e "$src/$f" ] && cp -rp "$src/$f" "$E/resume/$name/"; done
    basename "$src" > "$E/resume/$name/.folder"  # run.sh restores into a folder of this name
    echo "saved $name: $(ls "$E/resume/$name" | tr '\n' ' ')"
}
save qm_1k "$OUT/MODELPATH/xtb-aspirin_1k_schnet/checkpoints" checkpoint.pt best_checkpoint.pt config.yml
save qm_10k "$OUT/MODELPATH/xtb-aspirin_10k_schnet/checkpoints" checkpoint.pt best_checkpoint.pt config.yml
# StABlE training: resume.pt (all MD states, optimiser, RNG, phase), the latest model, the
# configs and the tensorboard logs (training curves); not the per-epoch checkpoints
ST_FILES=(resume.pt ckpt.pt stable_training_config.yml pretraining_config.yml logs)
ST=$(ls -d "$OUT"/stable_runs/schnet_aspirin_stable_1k_* 2>/dev/null | head -n 1 || true)
[ -n "$ST" ] && save stable_1k "$ST" "${ST_FILES[@]}"
# ablations' StABlE training (run.sh: abl_<variant>), the same files
for run in "$OUT"/stable_runs/schnet_aspirin_abl_*; do
    [ -d "$run" ] || continue
    name=${run#"$OUT"/stable_runs/schnet_aspirin_}; name=${name%%_lr=*}
    save "$name" "$run" "${ST_FILES[@]}"
done
# evaluations and pilots: eval_resume.pt without the trajectory so far (MD state, flags, sums:
# a few MB; the resumed run's full_traj.npy has NaN before the resume, its metrics are the
# same); .folder names the run folder under out/evals/
for d in "$OUT"/evals/schnet_aspirin_*/inference/pre; do
    [ -f "$d/eval_resume.pt" ] || continue
    run=$(basename "$(dirname "$(dirname "$d")")")
    exp=${run#schnet_aspirin_}; exp=${exp%%_lr=*}
    case $exp in pilot_qm_1k_*) name=pilot_${exp#pilot_qm_1k_} ;; *) name=eval_$exp ;; esac
    if [ -f "$OUT/done/$name" ]; then rm -rf "$E/resume/$name"; continue; fi
    mkdir -p "$E/resume/$name" && python -c "import sys; from mdsim.training.evaluate import slim_progress as s; s(*sys.argv[1:])" \
        "$d/eval_resume.pt" "$E/resume/$name/eval_resume.pt"
    echo "$run" > "$E/resume/$name/.folder"
    echo "saved $name: eval_resume.pt ($(du -h "$d/eval_resume.pt" | cut -f1))"
done
# finished stages whose run folder is no longer in out/ (a fresh machine): drop their saved state
for d in "$E"/resume/*/; do
    [ -d "$d" ] || continue
    n=$(basename "$d")
    [ -f "$OUT/done/$n" ] && { rm -rf "$d"; echo "dropped $n (finished)"; }
done
exit 0
