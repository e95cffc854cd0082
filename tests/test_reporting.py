"""Run outputs: step lines, metrics.jsonl that records each step once across resumes, TensorBoard, plots."""
import json
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from hsd_jax import hindsight, reporting


def tensorboard_events(directory):
    """Every Event in the TFRecord files under `directory` (record: u64 length, u32 crc, data, u32 crc)."""
    events = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def scalars(events):
    return [(e.step, v.tag, round(v.simple_value, 6)) for e in events for v in e.summary.value]


def test_values_and_durations_format_for_people():
    assert reporting.format_value(0.123456) == "0.1235"
    assert reporting.format_value(float("nan")) == "-"
    assert reporting.format_value(float("inf")) == "-"
    assert reporting.format_duration(4.2) == "4s"
    assert reporting.format_duration(65.2) == "1m05s"
    assert reporting.format_duration(3725) == "1h02m05s"


def test_step_line_shows_undefined_metrics_as_a_dash(tmp_path):
    reporter = reporting.Reporter(str(tmp_path), total_steps=20)
    line = reporter.step_line(3, {"reward": 0.25, "credit_mass_w8": float("nan"), "eval/avg@4": 0.5, "grad_norm": 1.0})
    assert line.startswith("step 3/20 reward=0.25 credit_mass_w8=- eval/avg@4=0.5")
    assert "nan" not in line and "grad_norm" not in line
    reporter.close()


def test_step_line_shows_eval_accuracies_only(tmp_path):
    reporter = reporting.Reporter(str(tmp_path), total_steps=20)
    line = reporter.step_line(3, {"eval/aime/avg@16": 0.25, "eval/aime/pass@4": 0.5, "eval/he/avg@1": 0.125,
                                  "eval/he/truncated": 0.0, "eval/accuracy": 0.2, "eval/response_length": 9.0})
    assert line.split(" | ")[0] == "step 3/20 eval/aime/avg@16=0.25 eval/he/avg@1=0.125 eval/accuracy=0.2"
    reporter.close()


def test_resume_keeps_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    first = reporting.Reporter(str(tmp_path), total_steps=5)
    for step in range(0, 5):  # the run checkpointed at step 3, logged 4, then was killed
        first.log(step, {"reward": step / 10}, echo=False)
    first.close()
    resumed = reporting.Reporter(str(tmp_path), total_steps=5, resume_step=3)
    for step in (4, 5):
        resumed.log(step, {"reward": 1 + step / 10}, echo=False)
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["reward"] for r in rows] == [0.0, 0.1, 0.2, 0.3, 1.4, 1.5]
    events = tensorboard_events(tmp_path / "tensorboard")
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [4]  # TensorBoard drops the killed run's events from step 4 on
    assert (4, "reward", 1.4) in scalars(events) and (3, "reward", 0.3) in scalars(events)


def test_fresh_run_starts_a_fresh_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 7, "reward": 1.0}) + "\n")
    reporter = reporting.Reporter(str(tmp_path), total_steps=2)
    reporter.log(1, {"reward": 0.5}, echo=False)
    reporter.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n" + '{"step": 2, "rew')
    assert reporting.truncate_metrics(path, 5) == [{"step": 1, "reward": 0.5}]


def test_disabled_reporter_writes_nothing(tmp_path):
    reporter = reporting.Reporter(str(tmp_path), total_steps=2, enabled=False)
    reporter.log(1, {"reward": 0.5})
    reporter.plot()
    reporter.close()
    assert list(tmp_path.iterdir()) == []


def test_plots_are_written_as_png(tmp_path):
    reporter = reporting.Reporter(str(tmp_path), total_steps=3)
    for step in range(4):
        reporter.log(step, {"reward": step / 4, "eval/avg@4": step / 8, "credit_mass_w8": float("nan")}, echo=False)
    credit = np.zeros((2, 10))
    credit[0, 4] = 2.0
    profile = hindsight.credit_profile(credit, np.ones((2, 10)), np.array([4, 2]), np.array([True, False]), radius=3)
    reporter.add_credit_profile(profile)
    reporter.add_credit_profile(profile)
    reporter.plot()
    reporter.close()
    for name in ("curves.png", "eval.png", "credit_profile.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    np.testing.assert_allclose(reporter.profile_total, [0, 0, 0, 4, 0, 0, 0])
    np.testing.assert_array_equal(reporter.profile_count, [2, 2, 2, 2, 2, 2, 2])
