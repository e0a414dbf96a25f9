# A/B of the real trainer's throughput: `llamita pretrain` of tinyllama-1.1b (bench/fp8_check.yaml, bf16,
# compiled, .benchdata shards) for 60 steps, for the working tree ("head") and for source trees exported from
# other commits into .ab/<name>/src (git archive COMMIT src | tar -x -C .ab/NAME). Prints tokens/s of each
# 10-step interval after step 20. On the GPU machine: VARIANTS="head before" bash bench/trainer_ab.sh
set -e
export PYTHONUNBUFFERED=1
for v in ${VARIANTS:-head}; do
  if [ $v = head ]; then P=src; else P=.ab/$v/src; fi
  rm -rf /tmp/ab-$v
  PYTHONPATH=$P timeout 200 python3 -m llamita.cli pretrain --config bench/fp8_check.yaml --out_dir /tmp/ab-$v --train.max_steps 60 --eval.interval 0 --checkpoint.interval 0 > /tmp/ab-$v.log 2>&1 || echo "$v failed: $(tail -3 /tmp/ab-$v.log)"
  python3 - $v <<'PY'
import json, sys
v = sys.argv[1]
rows = [json.loads(l) for l in open(f"/tmp/ab-{v}/metrics.jsonl") if '"tokens_per_s"' in l]
late = [r["tokens_per_s"] for r in rows if r["step"] > 20 and r["step"] % 10 == 0]
print(v, "tok/s per 10-step interval after step 20:", [round(x) for x in late], "mean", round(sum(late)/len(late)), "loss@60", rows[-1]["loss"])
PY
  rm -rf /tmp/ab-$v/checkpoints
done
