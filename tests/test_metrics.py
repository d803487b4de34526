"""Tests for egspo.metrics: JSON lines (content, resume dedupe), TensorBoard event files read
back record by record, the phase timer and the progress-bar line."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from egspo import metrics as metrics_lib
from egspo.metrics import MetricsWriter, Timer, bar_postfix, progress_bar, read_jsonl


def _read_events(logdir):
  """All Event protos of every event file under `logdir`, parsed from the TFRecord framing
  (uint64 length, uint32 crc, data, uint32 crc) with tensorboardX's own protobuf."""
  events = []
  files = sorted(logdir.rglob("events.out.tfevents.*"))
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
    assert pos == len(data), f"{path}: trailing bytes"
  return files, events


def _scalars(events):
  """{tag: [(step, value), ...]} of the scalar summaries."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def test_jsonl_records_and_types(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write_scalars(1, {"train/loss": jnp.float32(0.25), "train/reward": 0.5, "n": np.int64(3),
                        "ok": True, "bad": float("nan")})
    w.write_scalars(2, {"train/loss": 0.125})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  first = json.loads(lines[0])  # strict JSON: NaN is written as null
  assert set(first) == {"step", "time", "train/loss", "train/reward", "n", "ok", "bad"}
  assert first["step"] == 1 and first["train/loss"] == 0.25 and first["train/reward"] == 0.5
  assert first["n"] == 3 and isinstance(first["n"], int) and first["ok"] == 1
  assert first["bad"] is None
  assert abs(first["time"] - __import__("time").time()) < 60
  assert json.loads(lines[1])["train/loss"] == 0.125


def test_bad_metric_values_rejected(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="'vec'"):
      w.write_scalars(0, {"vec": jnp.ones(3)})
    with pytest.raises(ValueError, match="'step'"):
      w.write_scalars(0, {"step": 1})
    with pytest.raises(ValueError, match="'s'"):
      w.write_scalars(0, {"s": "text"})


def test_resume_drops_records_after_the_checkpoint(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in range(1, 8):  # crashed after step 7; last checkpoint was step 4
      w.write_scalars(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')  # torn line from the kill
  with MetricsWriter(tmp_path, resume_step=4, tensorboard=False) as w:
    for step in range(5, 9):
      w.write_scalars(step, {"loss": 10.0 * step})
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["loss"] for r in records] == [1, 2, 3, 4, 50, 60, 70, 80]


def test_fresh_start_moves_old_log_aside(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write_scalars(0, {"loss": 1.0})
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write_scalars(0, {"loss": 2.0})
  assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2.0]
  backups = list(tmp_path.glob("metrics.jsonl.bak-*"))
  assert len(backups) == 1 and read_jsonl(backups[0])[0]["loss"] == 1.0


def test_tensorboard_events_scalars(tmp_path):
  with MetricsWriter(tmp_path) as w:
    for step in range(3):
      w.write_scalars(step, {"train/reward": 0.5 * step, "train/kl": 0.01})
  files, events = _read_events(tmp_path / "tensorboard")
  assert len(files) == 1 and files[0].stat().st_size > 0
  assert events[0].file_version.startswith("brain.Event")
  scalars = _scalars(events)
  assert scalars["train/reward"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
  assert [s for s, _ in scalars["train/kl"]] == [0, 1, 2]
  np.testing.assert_allclose([v for _, v in scalars["train/kl"]], 0.01, rtol=1e-6)


def test_tensorboard_purge_step_on_resume(tmp_path):
  with MetricsWriter(tmp_path) as w:
    w.write_scalars(1, {"loss": 1.0})
  with MetricsWriter(tmp_path, resume_step=5) as w:
    w.write_scalars(6, {"loss": 6.0})
  files, events = _read_events(tmp_path / "tensorboard")
  assert len(files) == 2  # the restart's file does not overwrite the first run's
  starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert 6 in starts  # TensorBoard drops earlier-run events with step >= 6
  assert _scalars(events)["loss"] == [(1, 1.0), (6, 6.0)]


def test_rewind_to_the_step_actually_restored(tmp_path):
  """The writer opened at the newest checkpoint on disk (6), but that one was corrupt and the run
  restored step 4: rewind(4) drops steps 5-6 in metrics.jsonl and, by a purge, in TensorBoard."""
  with MetricsWriter(tmp_path) as w:
    for step in range(1, 7):
      w.write_scalars(step, {"loss": float(step)})
  with MetricsWriter(tmp_path, resume_step=6) as w:
    w.rewind(4)
    for step in (5, 6):
      w.write_scalars(step, {"loss": 10.0 * step})
  assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
      [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
  _, events = _read_events(tmp_path / "tensorboard")
  starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert starts[-1] == 5  # TensorBoard drops the first run's points at steps >= 5


def test_rewind_redo_drops_the_redone_records_at_the_step(tmp_path):
  """Stopped between the pre-RL evaluation (logged at the SFT step 4) and RL's first checkpoint:
  the relaunch redoes the evaluation at step 4, so that record goes, SFT's own record at 4 stays
  (and is written to TensorBoard again after the purge from step 4)."""
  with MetricsWriter(tmp_path) as w:
    w.write_scalars(4, {"sft/loss": 0.5})
    w.write_scalars(4, {"eval/accuracy": 0.25, "eval/n": 8})
    w.write_scalars(5, {"rl/loss": 0.1})
  with MetricsWriter(tmp_path, resume_step=4) as w:
    w.rewind(4, redo=("eval/",))
    w.write_scalars(4, {"eval/accuracy": 0.25, "eval/n": 8})
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert [sorted(k for k in r if k != "time") for r in records] == \
      [["sft/loss", "step"], ["eval/accuracy", "eval/n", "step"]]
  _, events = _read_events(tmp_path / "tensorboard")
  starts = [k for k, e in enumerate(events)
            if e.HasField("session_log") and e.session_log.status == 1]
  assert events[starts[-1]].step == 4  # TensorBoard drops the earlier points at steps >= 4
  # After that purge: SFT's record again and the redone evaluation, once each.
  assert _scalars(events[starts[-1]:]) == {
      "sft/loss": [(4, 0.5)], "eval/accuracy": [(4, 0.25)], "eval/n": [(4, 8.0)]}


def test_non_main_process_writes_nothing(tmp_path):
  w = MetricsWriter(tmp_path / "run", is_main_process=False)
  w.write_scalars(0, {"loss": 1.0})
  w.flush()
  w.close()
  assert not (tmp_path / "run").exists()
  out = io.StringIO()
  bar = progress_bar(10, is_main_process=False, file=out)
  bar.set_postfix(bar_postfix({"loss": 0.5}), refresh=False)
  bar.update()
  bar.close()
  assert out.getvalue() == ""


def test_timer_accumulates_phases():
  ticks = iter([0.0, 1.5, 2.0, 2.25, 3.0, 3.5, 10.0, 10.125])
  timer = Timer(clock=lambda: next(ticks))
  with timer("rollout"):
    pass
  with timer("value+reward"):
    pass
  with timer("rollout"):  # a second rollout in the same iteration adds up
    pass
  assert timer.seconds(prefix="time/") == {"time/rollout": 2.0, "time/value+reward": 0.25}
  assert timer.total() == 2.25
  timer.reset()
  with timer("update"):
    pass
  assert timer.seconds() == {"update": 0.125}


def test_timer_records_on_exception():
  ticks = iter([0.0, 4.0])
  timer = Timer(clock=lambda: next(ticks))
  with pytest.raises(RuntimeError):
    with timer("update"):
      raise RuntimeError("boom")
  assert timer.seconds() == {"update": 4.0}


def test_bar_postfix_fields():
  m = {"train/reward": 0.5123, "train/loss": 0.00123, "train/kl": jnp.float32(4e-3),
       "eval/reward": 0.1}
  # 'reward' matches two '*/reward' keys → ambiguous, so it is left out; exact keys win.
  assert bar_postfix(m, tokens_per_sec=1234.0) == {
      "L": 0.00123, "KL": pytest.approx(4e-3), "tok/s": "1.23k"}
  assert bar_postfix({"reward": 0.5, "loss": 2.0, "kl": 0.0, "x": 1.0}) == {
      "R": 0.5, "L": 2.0, "KL": 0.0}
  assert bar_postfix({"loss": 1.0}, fields=(("loss", "loss"),), tokens_per_sec=2.5e6) == {
      "loss": 1.0, "tok/s": "2.50M"}


def test_progress_bar_shows_position_and_postfix():
  out = io.StringIO()
  bar = progress_bar(10, initial=2, file=out, mininterval=0)
  bar.set_postfix(bar_postfix({"reward": 1.0, "loss": float("nan")}, tokens_per_sec=500.0),
                  refresh=False)
  bar.update()
  bar.update()
  assert bar.n == 4
  bar.close()
  line = out.getvalue().split("\r")[-1]
  assert "4/10" in line and "R=1, L=nan, tok/s=500" in line, line


def test_numpy_scalars_are_metrics():
  assert math.isclose(metrics_lib._to_scalar("x", np.float16(0.5)), 0.5)


# ---------------------------------------------------------------------------------------------
# Remote workdirs (gs://...): a local mirror copied over whole files. The "remote" here is a local
# directory that `is_remote` is told to treat as remote; the copies go through etils.epath as they
# would to GCS.


def test_is_remote():
  assert metrics_lib.is_remote("gs://bucket/run") and metrics_lib.is_remote("s3://b/r")
  assert not metrics_lib.is_remote("/tmp/run") and not metrics_lib.is_remote("runs/tiny")


@pytest.fixture
def remote(tmp_path, monkeypatch):
  root = tmp_path / "remote"
  monkeypatch.setattr(metrics_lib, "is_remote", lambda p: str(p).startswith(str(root)))
  return root


def test_remote_workdir_mirrored_and_resumed_on_a_new_machine(tmp_path, remote):
  with MetricsWriter(remote, local_dir=tmp_path / "vm1", sync_every_s=1e9) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"loss": float(step)})
    assert not (remote / "metrics.jsonl").exists()  # nothing copied before a sync is due
    w.flush()
    assert [r["step"] for r in read_jsonl(remote / "metrics.jsonl")] == [1, 2, 3]
  files, _ = _read_events(remote / "tensorboard")
  assert len(files) == 1
  # Preempted after the checkpoint at step 2; the run resumes on a new VM (empty local mirror).
  with MetricsWriter(remote, local_dir=tmp_path / "vm2", resume_step=2, sync_every_s=0) as w:
    w.write_scalars(3, {"loss": 30.0})
    # sync_every_s=0: every record is copied as it is written
    assert [(r["step"], r["loss"]) for r in read_jsonl(remote / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]
  files, events = _read_events(remote / "tensorboard")
  assert len(files) == 2 and _scalars(events)["loss"][-1] == (3, 30.0)


def test_remote_fresh_start_keeps_the_old_log(tmp_path, remote):
  with MetricsWriter(remote, local_dir=tmp_path / "vm1") as w:
    w.write_scalars(1, {"loss": 1.0})
  with MetricsWriter(remote, local_dir=tmp_path / "vm2") as w:  # no resume step: a new run
    w.write_scalars(1, {"loss": 5.0})
  assert read_jsonl(remote / "metrics.jsonl")[0]["loss"] == 5.0
  (backup,) = remote.glob("metrics.jsonl.bak-*")
  assert read_jsonl(backup)[0]["loss"] == 1.0
