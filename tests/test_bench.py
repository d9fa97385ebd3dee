"""`d2dpm bench` in quick mode on the tiny model: one valid JSON object with every figure.
Times are printed figures, never asserted."""

from __future__ import annotations

import json
import sys
import textwrap

from d2dpm.cli import main as cli_main
from d2dpm.config import DEFAULT_METHODS
from d2dpm.tools import bench


def test_bench_quick_prints_one_json_object_with_all_keys(conditional_model_dir, capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--model", str(conditional_model_dir), "--quick", "--skip-app", "--threads", "1", "--steps", "5",
                     "--device", "cpu", "--against", str(conditional_model_dir), "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert json.loads(out.read_text()) == report
    for key in ("date", "device", "threads", "torch", "model", "targets", "forward", "sampler_step", "compare",
                "calibration", "app_cold_start", "peak_rss_mb", "gpu"):
        assert key in report, key
    assert report["threads"] == 1 and report["device"] == "cpu" and report["gpu"] is None
    assert report["forward"]["fp_s"] > 0 and report["forward"]["q_s"] > 0 and report["forward"]["ratio_q_over_fp"] > 0
    assert set(report["sampler_step"]["corrections"]) == set(bench.CORRECTIONS)
    for figures in report["sampler_step"]["corrections"].values():
        assert figures["overhead_ratio"] > 0 and figures["correction_only_s"] > 0
    against = report["forward"]["against"]  # the same network against itself: equal sizes, a ratio near 1
    assert against["parameters"] == against["model_parameters"] and 0.2 < against["ratio_model_over_against"] < 5
    # The default comparison draws one image per class (the tiny model has 3).
    assert report["compare"]["methods"] == list(DEFAULT_METHODS) and report["compare"]["images"] == report["forward"]["batch"] == 3
    assert set(report["calibration"]) == {"rtn", "bias-correction", "adaround"}
    assert all(c["median_s"] > 0 and c["calib_samples"] == 4 for c in report["calibration"].values())
    assert report["app_cold_start"]["seconds"] is None and "skipped" in report["app_cold_start"]["note"]
    assert report["peak_rss_mb"] > 0
    # The record says how to reproduce the figures: the subcommand once, no output paths.
    assert report["command"].startswith("d2dpm bench --model ") and "--quick" in report["command"]
    assert "--out" not in report["command"] and "bench bench" not in report["command"]


def test_against_a_model_of_another_shape_is_refused_before_any_work(conditional_model_dir, pipeline_model_dir, capsys):
    assert cli_main(["bench", "--model", str(conditional_model_dir), "--quick", "--skip-app", "--device", "cpu",
                     "--against", str(pipeline_model_dir)]) == 2
    error = capsys.readouterr().err
    assert "--against" in error and "same conditioning" in error and "Traceback" not in error and "calibrating" not in error


def test_app_cold_start_times_the_first_http_answer(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import http.server, os, time
        time.sleep(0.3)
        http.server.HTTPServer(("127.0.0.1", int(os.environ["GRADIO_SERVER_PORT"])), http.server.SimpleHTTPRequestHandler).serve_forever()
    """))
    result = bench.app_cold_start(timeout=30, python=sys.executable, app=app)
    assert result["status"] == 200 and result["seconds"] >= 0.3


def test_app_cold_start_reports_an_absent_or_failing_app(tmp_path):
    assert bench.app_cold_start(app=tmp_path / "absent.py")["seconds"] is None
    failing = tmp_path / "app.py"
    failing.write_text("raise SystemExit('no app today')\n")
    result = bench.app_cold_start(timeout=30, app=failing)
    assert result["seconds"] is None and "no app today" in result["note"]


def test_app_cold_start_does_not_count_an_app_that_answers_then_dies(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import http.server, os, sys, threading
        server = http.server.HTTPServer(("127.0.0.1", int(os.environ["GRADIO_SERVER_PORT"])), http.server.SimpleHTTPRequestHandler)
        server.handle_request()  # one answer, then a crash (as a launch() that fails after serving)
        sys.exit("crashed after the first answer")
    """))
    result = bench.app_cold_start(timeout=30, python=sys.executable, app=app)
    assert result["seconds"] is None and "answered, then exited" in result["note"] and "crashed" in result["note"]
