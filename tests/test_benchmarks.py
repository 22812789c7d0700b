"""The pipeline benchmark still runs end to end (a tiny paired run; the figures themselves are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_paired_smoke(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_1f1b.py"), "--pp", "2", "--systems",
                    "ours-untied", "torch", "--steps", "1", "--warmup", "1", "--paired", "--json", str(out)],
                   check=True, timeout=300, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    [ratio] = result["ratios"]
    assert (ratio["ours"], ratio["peer"], ratio["pp"], ratio["paired"]) == ("ours-untied", "torch", 2, True)
    assert ratio["ratio"] > 0
    losses = {row["system"]: row["loss"] for row in result["rows"]}
    assert all(5.0 < loss < 8.0 for loss in losses.values()), losses  # ln(1024) ~ 6.9 at the start


def test_moe_benchmark_small_smoke(tmp_path):
    """benchmarks/moe.py at its smallest: every system computes the same function as ours (checked
    before timing), the EP systems agree with a serial block, EP1 and EP2 training steps reach the same
    loss, and the all-to-all time is attributed."""
    out = tmp_path / "moe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--small", "--repeats", "1", "--warmup", "1",
                    "--steps", "1", "--json", str(out)], check=True, timeout=300, capture_output=True, cwd=ROOT)
    result = json.loads(out.read_text())
    block = result["block"]
    assert block["equivalence_passed"]
    assert [r["system"] for r in block["rows"]] == ["ours", "ours-loop", "hf-eager", "hf-grouped-mm"]
    assert all(r["check"]["passed"] and r["check"]["max_rel_diff"] < 1e-5 and r["median_s"] > 0 for r in block["rows"])
    assert {(q["ours"], q["peer"]) for q in block["ratios"]} >= {("ours", "hf-grouped-mm"), ("ours", "hf-eager")}
    ep = result["ep"]
    assert ep["equivalence_passed"]
    rows = {r["system"]: r for r in ep["rows"]}
    expected = {"ours-ep1", "ours-ep2"} | ({"deepspeed-ep2"} if ep["deepspeed_unavailable"] is None else set())
    assert set(rows) == expected
    assert all(r["check_max_rel_diff"] < 1e-5 for r in rows.values())
    assert rows["ours-ep1"]["all_to_all_median_s"] == 0.0  # EP1 exchanges nothing
    assert 0.0 < rows["ours-ep2"]["all_to_all_share"] < 1.0
    assert ("ours-ep2", "ours-ep1") in {(q["ours"], q["peer"]) for q in ep["ratios"]}
    train = result["train"]
    assert [r["system"] for r in train["rows"]] == ["ours-ep1-train", "ours-ep2-train"]
    assert train["equivalence_passed"] and train["loss_rel_diff"] < 1e-5  # EP1 and EP2 train the same model
    assert train["rows"][1]["all_to_all_median_s"] > 0.0


def test_planner_accuracy_benchmark_smoke(tmp_path):
    """benchmarks/planner_accuracy.py at its smallest: the machine is fitted, and a serial and a DP2 step
    are predicted and measured (the errors themselves are the benchmark's to report, not checked here)."""
    out = tmp_path / "accuracy.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planner_accuracy.py"), "--layouts", "serial", "DP2",
                    "--steps", "1", "--warmup", "1", "--rounds", "1", "--fit-repeats", "2", "--json", str(out)], check=True, timeout=300, capture_output=True,
                   cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["fit"]["alpha_us"] >= 0 and result["fit"]["beta_gbs"] > 0 and result["fit"]["model_gflops"] > 0
    assert [r["layout"] for r in result["rows"]] == ["serial", "DP2"]
    assert all(r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in result["rows"])
