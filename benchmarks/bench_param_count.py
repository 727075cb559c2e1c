"""Parameter counting on the meta device vs building the network for real, side by side.

    python benchmarks/bench_param_count.py [entry ...]

Prints, per entry, both times, their ratio and checks that the two counts agree.
Goal: the meta-device count is exact and >= 5x faster than a real build for every entry.
"""

from __future__ import annotations

import sys
import time

import torch

from medseg.models import build_model
from medseg.models.complexity import count_params, count_params_of

DEFAULT = ["unet_resnet50", "segformer_b4", "transunet_r50_vit", "upernet_beit_l"]


def main(names: list[str]) -> None:
    print(f"{'entry':<24}{'real build s':>14}{'meta s':>10}{'speed-up':>10}  params M")
    speedups = {}
    for name in names:
        t0 = time.perf_counter()
        with torch.no_grad():
            real = count_params(build_model(name, 1, 9, (224, 224)))
        t1 = time.perf_counter()
        meta = count_params_of(name, 1, 9, (224, 224))
        t2 = time.perf_counter()
        assert real == meta, f"{name}: real build has {real} parameters, meta count {meta}"
        print(f"{name:<24}{t1 - t0:>14.2f}{t2 - t1:>10.2f}{(t1 - t0) / (t2 - t1):>9.1f}x  {real / 1e6:.2f}")
        speedups[name] = (t1 - t0) / (t2 - t1)
    worst = min(speedups, key=speedups.get)
    print(f"goal: exact meta-device parameter counts >= 5x faster than a real build (slowest: {worst} "
          f"{speedups[worst]:.1f}x) -> {'met' if speedups[worst] >= 5 else 'NOT met'}")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
