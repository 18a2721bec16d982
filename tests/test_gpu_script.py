"""benchmarks/gpu.sh, the prepared GPU check, run end to end on the CPU (--dry-run: toy
sizes, the same code paths): it must write one JSON file with every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the script as a process

REPO = Path(__file__).resolve().parent.parent

FIGURES = [
    ("seed_report_train", "fp32_eager", "images_per_second"),
    ("seed_report_train", "bf16_eager", "images_per_second"),
    ("seed_report_train", "fp32_compiled", "images_per_second"),
    ("seed_report_train", "bf16_compiled", "images_per_second"),
    ("seed_report_eval", "fp32", "images_per_second"),
    ("seed_report_eval", "bf16", "images_per_second"),
    ("standard_train", "bf16_eager", "images_per_second"),
    ("standard_train", "bf16_compiled", "images_per_second"),
    ("loop_efficiency", "standard_bf16", "ratio"),
    ("loop_efficiency", "seed_report_bf16", "ratio"),
    ("pack_speedup", "cpu_demo_width_32px", "ratio"),
    ("pack_speedup", "standard_32px", "ratio"),
    ("pack_speedup", "seed_report_bf16_224px", "ratio"),
    ("projected_seed_report_study", "bf16_eager", "hours"),
    ("projected_seed_report_study", "fp32_eager_as_the_report", "hours"),
    ("projected_seed_report_study", "bf16_compiled", "hours"),
    ("projected_seed_report_study", "bf16_eager_waves_packed", "hours"),
    ("peak_memory_gib",),
    ("seed_report_train", "bf16_eager", "peak_memory_gib"),
]


def _numbers(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, (*path, i))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_gpu_script_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    for path in FIGURES:
        value = res
        for key in path:
            value = value[key]
        assert isinstance(value, float) and value > 0, (path, value)
    bad = [(p, v) for p, v in _numbers(res) if not v > 0]
    assert not bad, bad
    assert res["gpu_name"] and res["dry_run"] is True and res["skipped"] == []
    arithmetic = res["projected_seed_report_study"]["bf16_eager"]["arithmetic"]
    assert arithmetic.startswith("11 trainings x 100 epochs x (45000 images /"), arithmetic
