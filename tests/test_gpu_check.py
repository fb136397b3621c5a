"""The GPU check's dry run on the CPU: the script a GPU machine runs works end to end and writes every figure."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_shared


def test_gpu_check_dry_run_on_cpu_writes_every_figure(tmp_path):
    require_shared()
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["machine"]["device"] == "cpu" and figures["machine"]["auto_precision"] in ("float32", "bfloat16")
    assert all("error" not in figures[part] for part in ("sample", "render", "build")), figures
    assert min(figures["sample"]["images_per_second"].values()) > 0
    for row in figures["render"]["rows"].values():
        assert row["icon_steps_per_second"] > 0 and -1 <= row["mean_cosine"] <= 1
    assert figures["build"]["ran"] == ["sample", "project", "grid", "render", "tiles"]
