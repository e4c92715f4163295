#!/bin/bash
# session 4: one device call on nvidia-h200-x2. GPU0: reduce latency then capture/flow; GPU1: the 7B notebook grid.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/nb/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -1
mkdir -p $OUT/grid /tmp/logs
echo "installs $(( $(date +%s) - T0 )) s"
( CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site python3 benchmarks/grid_7b.py --out $OUT/grid --project /tmp/grid_7b --budget-s 410 > /tmp/logs/grid.log 2>&1 ) &
P1=$!
( CUDA_VISIBLE_DEVICES=0 python3 benchmarks/reduce.py --out $OUT/reduce.json --time-budget 270 > /tmp/logs/reduce.log 2>&1;
  echo "reduce done $(( $(date +%s) - T0 )) s" >> /tmp/logs/reduce.log;
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/run.py --out /tmp/bench --only capture,flow --budget-s 160 --wheels .whl/bench,.whl/store > /tmp/logs/bench.log 2>&1;
  tar czf $OUT/bench.tgz -C /tmp bench ) &
P2=$!
( while true; do sleep 20; tar czf $OUT/logs.tgz.tmp -C /tmp logs 2>/dev/null && mv $OUT/logs.tgz.tmp $OUT/logs.tgz; done ) &
LOOP=$!
wait $P1 $P2
kill $LOOP; tar czf $OUT/logs.tgz -C /tmp logs
echo "total $(( $(date +%s) - T0 )) s"; tail -n 3 /tmp/logs/*.log; ls -la $OUT $OUT/grid
