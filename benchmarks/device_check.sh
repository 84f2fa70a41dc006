#!/usr/bin/env bash
# The prepared GPU check: one script, at most 8 minutes on one GPU, a JSON report in $OUT (./device_report when
# unset). Run it whenever a CUDA device is lent; put its numbers in the README. Each part has its own time limit
# and records its exit status, so one failure does not hide the others.
#
#   bash benchmarks/device_check.sh
#
# Parts: the CUDA-marked tests; a Distiller epoch of the zoo's resnet56 -> resnet20 on CIFAR-shaped random data in
# fp32, bf16 and fp16 with step times; fit-priors on CUDA for two ops with few steps; bench_speed on CUDA in bf16
# (128x3x32x32 and 256x3x224x224: ours eval and train against kornia's RandAugment forward, dispatched ops per
# call; compile=True compiles its graphs first: pixels and sample, train and eval, per image size). The time
# limits add up to 470 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_report}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if ! "$PY" -c "import diffaug" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]" >"$OUT/install.log" 2>&1 || true
fi

timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py >"$OUT/cuda_tests.log" 2>&1
echo "{\"cuda_tests_rc\": $?}" >"$OUT/cuda_tests.json"

timeout 90 "$PY" - "$OUT" >"$OUT/epoch.log" 2>&1 <<'PYTHON'
import json, sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset
from diffaug import PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.data import random_crop_flip
from diffaug.distill.models import build_model

report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "epochs": {}}
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.rand(2048, 3, 32, 32, generator=g), torch.randint(0, 100, (2048,), generator=g))
for amp in (None, "bf16", "fp16"):
    torch.manual_seed(0)
    teacher, student = build_model("resnet56", 100), build_model("resnet20", 100)
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    distiller = Distiller(teacher, student, PolicyAugmenter(), standard_augment=random_crop_flip, device="cuda",
                          amp=amp, search_epochs=[0], progress=False)
    torch.cuda.synchronize(); start = time.perf_counter()
    history = distiller.fit(loader, 1)
    torch.cuda.synchronize()
    steps = len(history["search"]) + len(history["train"])
    report["epochs"][str(amp)] = {"seconds": time.perf_counter() - start, "steps": steps,
                                  "ms_per_step": 1e3 * (time.perf_counter() - start) / steps,
                                  "final_loss": history["train"][-1]["loss"]}
json.dump(report, open(f"{sys.argv[1]}/epoch.json", "w"), indent=1)
print(json.dumps(report, indent=1))
PYTHON
echo "{\"epoch_rc\": $?}" >"$OUT/epoch_rc.json"

timeout 60 "$PY" -m diffaug fit-priors --ops Rotate Brightness --steps 200 --refine-iterations 0 --device cuda \
  --out "$OUT/priors" >"$OUT/fit_priors.log" 2>&1
echo "{\"fit_priors_rc\": $?}" >"$OUT/fit_priors.json"

timeout 200 "$PY" benchmarks/bench_speed.py --device cuda --dtype bfloat16 --quick >"$OUT/bench_speed.txt" 2>"$OUT/bench_speed.log"
echo "{\"bench_speed_rc\": $?}" >"$OUT/bench_speed.json"
cat "$OUT"/*.json
