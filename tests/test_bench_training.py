"""bench/training.py: the steady-state rate from metrics.jsonl windows, clear failures on missing
metrics, and one tiny end-to-end run (workspace -> training scripts as subprocesses -> table)."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_training", ROOT / "bench" / "training.py")
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)


def _write(path: Path, rows) -> list[dict]:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steady_rate_uses_only_windows_after_warmup(tmp_path):
    # per step 4 samples; each row's samples_per_s covers the steps since the previous row
    rows = _write(tmp_path / "metrics.jsonl", [
        {"step": 10, "loss": 1.0, "samples_per_s": 0.5, "max_mem_gb": 9.0},  # warm-up window: ignored
        {"step": 20, "loss": 1.0, "samples_per_s": 4.0, "max_mem_gb": 12.0},  # 40 samples in 10 s
        {"step": 30, "loss": 1.0, "samples_per_s": 8.0, "max_mem_gb": 12.5},  # 40 samples in 5 s
        {"step": 30, "mIoU/gta": 0.1},  # an evaluation row: not a training row
    ])
    r = bt.steady_rate(rows, warmup=10, per_step=4, source="x", need_mem=True)
    assert r["samples_per_s"] == pytest.approx(80 / 15)
    assert r["it_per_s"] == pytest.approx(20 / 15)
    assert r["steps"] == 20 and r["peak_gib"] == 12.5
    # no warm-up: the first window counts too (40 samples in 80 s more)
    assert bt.steady_rate(rows, 0, 4, "x", False)["samples_per_s"] == pytest.approx(120 / 95)


def test_missing_metrics_fail_with_the_source(tmp_path):
    src = "train/finetune_unet.py (run/metrics.jsonl)"
    with pytest.raises(bt.BenchError, match=re.escape(src) + ".*samples_per_s"):
        bt.steady_rate([{"step": 10, "loss": 1.0}], 0, 4, src, False)
    with pytest.raises(bt.BenchError, match=re.escape(src) + ".*max_mem_gb"):
        bt.steady_rate([{"step": 10, "loss": 1.0, "samples_per_s": 3.0}], 0, 4, src, need_mem=True)
    with pytest.raises(bt.BenchError, match="no logged steps after the 10 warm-up"):
        bt.steady_rate([{"step": 10, "loss": 1.0, "samples_per_s": 3.0}], 10, 4, src, False)


def test_tiny_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the scripts' processes: no thread oversubscription on a busy CI box
    out = tmp_path / "BENCH.md"
    table = bt.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--only", "unet", "segmentation", "uda",
                     "--steps", "2", "--warmup", "2", "--images", "2", "--repeats", "2", "--infer-warmup", "1",
                     "--workdir", str(tmp_path / "work"), "--write", str(out)])
    assert out.read_text().strip() == table.strip()
    rates = {}
    for line in table.splitlines():
        m = re.match(r"\| (\S+(?: \S+)?) \| .*? \| ([0-9.]+) (samples|images)/s", line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    assert set(rates) == {"train/finetune_unet.py", "train/train_segmentation.py", "train/train_uda.py",
                          "segmentation forward", "segmentation.evaluate slide"}, table
    peaks = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in table.splitlines() if line.startswith("| train/")}
    assert all(float(v) > 0 for v in peaks.values()), table  # CPU: the peak RSS of each script's process
    assert all(v > 0 for v in rates.values()), rates
    assert "steps 3-4" in table and "`python bench/training.py --preset tiny" in table
    # the big optimizer checkpoints are removed, the metrics kept
    assert not (tmp_path / "work" / "run_unet" / "checkpoints").exists()
    assert (tmp_path / "work" / "run_unet" / "metrics.jsonl").is_file()
