#!/usr/bin/env bash
# Train the shipped bundles' models on a lent GPU machine (see docs/TRAINING.md).
# Phase "start": lay out the data carried in .gpu1/ and launch the two CIFAR-10 pipelines in the
#   background (setsid, so they outlive this command).
# Phase "finish": add the Imagenette shards carried in .gpu2/, train Imagenette, wait for all
#   three, and copy results into $OUT.
# Phase "vit": lay out the CIFAR-10 shards carried in .gpu1/cifar/, train the ViT GPU recipe
#   (teacher-only: teacher.pt + results.json), wait for it, and copy results into $OUT.
# Phase "inet": only lay out the Imagenette shards carried in .gpu1/inet/ (the first half: the
#   working tree that travels is limited to 64 MiB), for phase "deit" in the next call.
# Phase "deit": add the rest carried in .gpu2/, check all 14 shards are there, train DeiT-tiny
#   (224 px) and its two token-bottleneck splits (block1, then the stem recipe on the same
#   teacher), wait, and copy results, students and the teacher into $OUT.
set -u
phase=$1
D=/tmp/esdata; R=/tmp/esruns
export EDGESPLIT_DATA=$D PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $D/cifar10-jpeg $D/teachers $D/imagenette-224 $R
RUNS="cifar-scratch cifar-shared inet"
launch() {  # name recipe
  setsid nohup python3 -m edgesplit train models/recipes/$2.yaml --run-dir $R/$1 --workers 8 > $R/$1.log 2>&1 < /dev/null &
}
if [ "$phase" = start ]; then
  cp .gpu1/cifar/* $D/cifar10-jpeg/; cp .gpu1/teachers/* $D/teachers/; cp .gpu1/inet/* $D/imagenette-224/
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  launch cifar-scratch cifar10-resnet56-bottlefit
  launch cifar-shared cifar10-sharedteacher-bottlefit
  sleep 45; tail -n 3 $R/*.log
  exit 0
fi
if [ "$phase" = inet ]; then
  cp .gpu1/inet/* $D/imagenette-224/; ls $D/imagenette-224 | wc -l; exit 0
fi
if [ "$phase" = deit ]; then
  cp .gpu2/* $D/imagenette-224/ 2>/dev/null
  n=$(ls $D/imagenette-224/*.tar.gz 2>/dev/null | wc -l)
  [ "$n" -eq 14 ] || { echo "phase deit: $n of 14 Imagenette shards in $D/imagenette-224 (run phase inet first)"; exit 1; }
  RUNS="imagenette-deit-tiny-bottlefit-gpu imagenette-deit-tiny-bottlefit-stem-gpu"
  # the stem recipe reads the first run's teacher.pt (beside its run dir): one chain, in the background
  setsid nohup bash -c "python3 -m edgesplit train models/recipes/imagenette-deit-tiny-bottlefit-gpu.yaml --run-dir $R/imagenette-deit-tiny-bottlefit-gpu --workers 12 > $R/imagenette-deit-tiny-bottlefit-gpu.log 2>&1 && python3 -m edgesplit train models/recipes/imagenette-deit-tiny-bottlefit-stem-gpu.yaml --run-dir $R/imagenette-deit-tiny-bottlefit-stem-gpu --workers 12 > $R/imagenette-deit-tiny-bottlefit-stem-gpu.log 2>&1" < /dev/null > /dev/null 2>&1 &
fi
if [ "$phase" = vit ]; then
  cp .gpu1/cifar/* $D/cifar10-jpeg/
  RUNS=cifar-vit; launch cifar-vit cifar10-vit-gpu
fi
if [ "$phase" = finish ]; then  # phase "collect" only waits and copies
  cp .gpu2/* $D/imagenette-224/
  ls $D/imagenette-224 | tr '\n' ' '; echo
  launch inet imagenette-resnet18-bottlefit
fi
deadline=$(( $(date +%s) + ${WAIT_S:-530} ))
while [ "$(date +%s)" -lt $deadline ]; do
  done=0; for n in $RUNS; do [ -f $R/$n/results.json ] && done=$((done+1)); done
  [ $done -eq $(echo $RUNS | wc -w) ] && break
  sleep 10
done
for n in $RUNS; do
  echo "== $n"; grep -E '"epoch"|event' $R/$n/log.jsonl 2>/dev/null | tail -n 4; tail -c 600 $R/$n.log
  cat $R/$n/log.jsonl > $OUT/$n-log.jsonl 2>/dev/null
done
cp $R/cifar-scratch/student.pt $OUT/cifar-scratch-student.pt 2>/dev/null
cp $R/inet/student.pt $OUT/inet-student.pt 2>/dev/null
cp $R/cifar-vit/teacher.pt $OUT/cifar-vit-teacher.pt 2>/dev/null
for n in imagenette-deit-tiny-bottlefit-gpu imagenette-deit-tiny-bottlefit-stem-gpu; do
  cp $R/$n/student.pt $OUT/$n-student.pt 2>/dev/null
done
cp $R/imagenette-deit-tiny-bottlefit-gpu/teacher.pt $OUT/deit-tiny-teacher.pt 2>/dev/null
for n in $RUNS; do cp $R/$n/results.json $OUT/$n-results.json 2>/dev/null; done
ls -la $OUT
