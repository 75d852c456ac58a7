# Issue 3 experiment (started 2026-12-03): the card's three-stage recipe on a deeper, narrower MoE
# (6 layers, 8 experts of width 224: 11.9 M parameters, 23.9 MB fp16) and its dense twin (MLP 448), with the
# movie train split uncapped (~/.cache/moeopt/data-movie-full: 10,817 reviews). MoE and dense run side by side.
set -e
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH=.
C="--batch 16 --seq-len 256 --hidden 256 --expert-inter 224 --layers 6 --threads 1 --data-root $HOME/.cache/moeopt/data-movie-full"
R=$HOME/.cache/moeopt/retrain6
mkdir -p $R
for a in moe dense; do
  .venv/bin/python scripts/train_reference.py --arch $a --out $R/$a-stage1 --seed 0 --steps 560 --warmup 30 --lr 0.002 $C --apps-share 0.45 > $R/$a-stage1.log 2>&1 &
done; wait
for a in moe dense; do
  .venv/bin/python scripts/train_reference.py --arch $a --out $R/$a-stage2 --seed 1 --steps 650 --warmup 30 --lr 0.001 $C --apps-share 0.7 --label-loss 1.0 --aux per-layer --aux-coef 0.03 --init-from $R/$a-stage1 > $R/$a-stage2.log 2>&1 &
done; wait
for a in moe dense; do
  .venv/bin/python scripts/train_reference.py --arch $a --out $R/$a-stage3 --seed 2 --steps 250 --warmup 20 --lr 0.0005 $C --apps-share 0.9 --label-loss 2.0 --aux per-layer --aux-coef 0.03 --eval-every 50 --init-from $R/$a-stage2 > $R/$a-stage3.log 2>&1 &
done; wait
for a in moe dense; do
  .venv/bin/python scripts/eval_reference.py --model $R/$a-stage3 --out $R/eval-$a.json > $R/eval-$a.log 2>&1
done
echo DONE > $R/DONE
