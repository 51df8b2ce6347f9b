"""train/train_uda.py: the self-training loop's logged terms, exact resume (one process, HRDA with
feature distance and RCS), and a 2-rank gloo run whose resume is exact."""
import json
import os
import subprocess
import sys

import pytest
import torch

from segmentation.models import load_segmentor
from tests.test_seg_train import ROOT, _same_weights, write_scenes
from train.train_uda import main, parse_args

# pseudo-threshold 0: every target pixel weighs 1, so the mix and masked losses train from the start
# (a random tiny teacher is never 96.8 % confident); 8-px MIC blocks on 32-px crops
FAST = ["--tiny", "--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "2", "--log-every", "2",
        "--pseudo-threshold", "0", "--mask-block", "8", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("uda_data")
    return (write_scenes(root / "src", 3, size=48), write_scenes(root / "gen", 2, size=32, seed=1, generated=True),
            write_scenes(root / "tgt", 3, size=48, seed=2, noise=40.0))


def _args(out, data, *extra):
    src, gen, tgt = data
    return parse_args(["--source", f"folder:{src}", "--generated", str(gen), "--target", str(tgt / "images"),
                       "--crop", "32", "--source-scale", "64", "64", "--target-scale", "64", "64",
                       "--output-dir", str(out), *FAST, *extra])


def _ckpt(out, step):
    return torch.load(out / "checkpoints" / f"step_{step:07d}.pt", weights_only=True)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_uda_terms_and_exact_resume(tmp_path, data, one_thread):
    run = ["--max-iters", "4", "--ckpt-every", "2"]
    main(_args(tmp_path / "a", data, *run, "--keep-last", "2"))
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"loss_src", "loss_mix", "loss_masked", "pseudo_weight", "generated_share"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss_src"] + r["loss_mix"] + r["loss_masked"], rel=1e-6)
        assert r["loss_mix"] > 0 and r["loss_masked"] > 0 and r["pseudo_weight"] == 1.0
    c2, c4 = _ckpt(tmp_path / "a", 2), _ckpt(tmp_path / "a", 4)
    assert c4["teacher"].keys() == c4["model"].keys()
    assert not _same_weights(c2["teacher"], c4["teacher"]) and not _same_weights(c4["teacher"], c4["model"])
    main(_args(tmp_path / "b", data, *run, "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000002.pt")))
    b4 = _ckpt(tmp_path / "b", 4)
    assert _same_weights(c4["model"], b4["model"]) and _same_weights(c4["teacher"], b4["teacher"])
    assert torch.equal(c4["optimizer"]["state"][0]["exp_avg"], b4["optimizer"]["state"][0]["exp_avg"])
    assert _rows(tmp_path / "b")[-1] == rows[-1] | {"samples_per_s": _rows(tmp_path / "b")[-1]["samples_per_s"]}
    m = load_segmentor(tmp_path / "a" / "model.safetensors")  # the export is the student
    assert all(torch.equal(v, c4["model"][k]) for k, v in m.state_dict().items())


def test_uda_without_mic_and_teacher_restarts(tmp_path, data, one_thread):
    """--mic-lambda 0 drops the masked pass; a checkpoint without a teacher restarts it from the student."""
    main(_args(tmp_path / "a", data, "--max-iters", "2", "--ckpt-every", "2", "--mic-lambda", "0"))
    assert "loss_masked" not in _rows(tmp_path / "a")[-1]
    c = _ckpt(tmp_path / "a", 2)
    del c["teacher"]
    torch.save(c, tmp_path / "no_teacher.pt")
    main(_args(tmp_path / "b", data, "--max-iters", "3", "--ckpt-every", "3", "--mic-lambda", "0",
               "--resume", str(tmp_path / "no_teacher.pt")))
    assert "restarts as a copy of the student" in (tmp_path / "b" / "log.txt").read_text()


def test_uda_hrda_with_feature_distance_and_rcs_resumes_exactly(tmp_path, data, one_thread):
    """HRDA (multi-resolution pseudo-labels by sliding-window inference), the ImageNet feature
    distance on the source and rare-class sampling: a run resumed at step 1 ends as the uninterrupted one.
    Source data only (--mix-ratio 1:0): the generated 32-px images, padded to the 64-px crop, are mostly
    void in the single feature cell of a crop, where the feature distance does not count."""
    run = ["--model", "hrda_daformer_mitb5", "--crop", "64", "--mix-ratio", "1:0", "--fd-lambda", "0.5", "--fd-classes",
           *map(str, range(19)), "--fd-min-ratio", "0", "--rcs", "--rcs-min-pixels", "50", "--max-iters", "3",
           "--ckpt-every", "1"]
    main(_args(tmp_path / "a", data, *run, "--keep-last", "3"))
    rows = _rows(tmp_path / "a")
    assert rows[-1]["loss_fd"] > 0
    assert rows[-1]["loss"] == pytest.approx(sum(rows[-1][k] for k in ("loss_src", "loss_fd", "loss_mix",
                                                                       "loss_masked")), rel=1e-6)
    a3 = _ckpt(tmp_path / "a", 3)
    assert a3["model_config"]["hrda"] is not None and "fd_backbone" in a3
    main(_args(tmp_path / "b", data, *run, "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000001.pt")))
    b3 = _ckpt(tmp_path / "b", 3)
    assert _same_weights(a3["model"], b3["model"]) and _same_weights(a3["teacher"], b3["teacher"])


def test_two_process_gloo_run_resumes_exactly(tmp_path, data):
    """torchrun with 2 CPU processes (gloo): DDP self-training with three backward passes per step
    (gradients all-reduced on the last), per-rank RNG states in the checkpoint, then a run resumed
    from step 2 in another folder ends with the uninterrupted run's student, teacher and optimizer."""
    src, gen, tgt = data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "train.train_uda", "--source", f"folder:{src}", "--generated", f"dginstyle:{gen}", "--mix-ratio", "1:1",
           "--target", str(tgt / "images"), "--crop", "32", "--source-scale", "64", "64", "--target-scale", "64",
           "64", "--max-iters", "4", "--ckpt-every", "2", "--keep-last", "2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(cmd + ["--output-dir", str(a)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a4 = _ckpt(a, 4)
    assert a4["world_size"] == 2 and len(a4["rng"]) == 2
    assert not torch.equal(a4["rng"][0]["torch"], a4["rng"][1]["torch"])  # per-rank streams
    assert "rank 0/2" in (a / "log.txt").read_text()
    r = subprocess.run(cmd + ["--output-dir", str(b), "--resume", str(a / "checkpoints" / "step_0000002.pt")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    b4 = _ckpt(b, 4)
    assert _same_weights(a4["model"], b4["model"]) and _same_weights(a4["teacher"], b4["teacher"])
    assert torch.equal(a4["optimizer"]["state"][0]["exp_avg"], b4["optimizer"]["state"][0]["exp_avg"])
    assert not _same_weights(_ckpt(a, 2)["model"], a4["model"])  # it did train
    assert _rows(b)[-1]["loss"] == pytest.approx(_rows(a)[-1]["loss"], rel=1e-6)


def test_uda_divergence_stops_the_run_and_resume_logs_changed_settings(tmp_path, data, one_thread):
    from train.common import TrainingDiverged

    main(_args(tmp_path / "a", data, "--max-iters", "2", "--ckpt-every", "2"))
    assert "step       2/2" in (tmp_path / "a" / "log.txt").read_text()  # step / max steps and the ETA
    out = tmp_path / "b"
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        main(_args(out, data, "--max-iters", "40", "--ckpt-every", "40", "--lr", "1e6",
                   "--warmup-iters", "0", "--max-bad-steps", "3",
                   "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000002.pt")))
    assert "lr: 0.001 -> 1000000.0" in (out / "log.txt").read_text()
    assert not (out / "model.safetensors").exists()


def test_a_skipped_step_puts_back_the_student_and_teacher_batchnorm_statistics(tmp_path, data, one_thread,
                                                                               monkeypatch):
    """A NaN second batch reaches the teacher's training-mode forward and the student's: the step is
    skipped, and both models' running statistics are as they were (NaN ones would be refused at the
    next checkpoint)."""
    from train import common

    loader = common.segmentation_loader

    def nan_second_batch(*a, **k):
        for i, batch in enumerate(loader(*a, **k)):
            if i == 1:
                batch = {**batch, "image": batch["image"] * float("nan"),
                         "target_image": batch["target_image"] * float("nan")}
            yield batch

    monkeypatch.setattr(common, "segmentation_loader", nan_second_batch)
    out = tmp_path / "a"
    main(_args(out, data, "--max-iters", "3", "--ckpt-every", "1", "--keep-last", "3", "--log-every", "1"))
    c = [_ckpt(out, s) for s in (1, 2, 3)]
    for part in ("model", "teacher"):
        stats = [k for k in c[0][part] if k.endswith(("running_mean", "running_var"))]
        assert stats
        assert all(torch.equal(c[0][part][k], c[1][part][k]) for k in stats)  # step 2 skipped: kept
        assert not all(torch.equal(c[1][part][k], c[2][part][k]) for k in stats)  # step 3 moved them
    assert _same_weights(c[0]["model"], c[1]["model"]) and not _same_weights(c[1]["model"], c[2]["model"])
    assert "non-finite loss or gradient" in (out / "log.txt").read_text()
