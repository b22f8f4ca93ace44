"""bench/gpu.py: its --help and no-CUDA line, and every section run on the CPU at toy sizes
(``--device cpu --tiny``), so shape, dtype and API errors surface here before a GPU run."""

import json

import pytest
import torch

from bench import gpu

TINY_RUN = ["--device", "cpu", "--tiny", "--train-steps", "4", "--warmup-steps", "1", "--timed-steps", "1"]


def _result(out) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "gpu.json").read_text())["sections"]}


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--sections", "--out", "--results", "--splice", "--device", "--tiny", "--budget"):
        assert option in text
    for name in gpu.SECTIONS:
        assert name in text


def test_without_cuda_it_stops_in_one_line(capsys, monkeypatch, tmp_path):
    """The README's command on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    assert gpu.main(["--out", str(tmp_path / "out"), "--results", str(results)]) == gpu.NO_CUDA_EXIT == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.gpu: no CUDA device: ")
    assert not (tmp_path / "out").exists() and results.read_text() == "# Benchmark results\n"  # nothing written


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast's bf16 rms_norm
def test_sections_on_the_cpu(tmp_path):
    """Kernel parity, bf16 vs fp32 training, throughput and the planner's prediction, in
    this process, at toy sizes; the numbers land in gpu.json and gpu.md."""
    out = tmp_path / "out"
    code = gpu.main([*TINY_RUN, "--no-isolate", "--sections", "kernels", "bf16_vs_fp32", "throughput", "memory",
                     "--out", str(out)])
    sections = _result(out)
    assert code == 0, {n: (s["status"], s["error"]) for n, s in sections.items()}
    assert len(sections["kernels"]["rows"]) == 2 * len(gpu.MASKS)  # CPU kernel in fp32 and bf16
    losses = sections["bf16_vs_fp32"]["numbers"][-1]
    assert len(losses["losses_fp32"]) == len(losses["losses_bf16"]) == 4
    assert all(r["tokens_per_s"] > 0 for r in sections["throughput"]["numbers"])
    assert all(r["planned_live"] > 0 and r["measured"] is None for r in sections["memory"]["numbers"])  # no CUDA peak
    md = (out / "gpu.md").read_text()
    assert md.startswith("## GPU node check: CPU") and "| kernels | pass |" in md


@pytest.mark.e2e
def test_ring_section_over_gloo(tmp_path):
    """The ring section's ranks, exchange and comparison, at cp=2 over gloo on the CPU."""
    assert gpu.main([*TINY_RUN, "--no-isolate", "--sections", "ring", "--out", str(tmp_path)]) == 0
    rows = _result(tmp_path)["ring"]["numbers"]
    assert [(r["cp"], r["dtype"], r["documents"]) for r in rows] == [
        (2, "float32", "no"), (2, "float32", "yes"), (2, "bfloat16", "no"), (2, "bfloat16", "yes")]


@pytest.mark.e2e
def test_extend_32k_through_train_py_in_its_own_process(tmp_path):
    """The real entry point (train.py, Hydra, the data pipeline, the gate), run by a section
    in a process of its own, as every section runs by default."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    assert gpu.main([*TINY_RUN, "--extend-steps", "3", "--sections", "extend_32k", "--out", str(tmp_path),
                     "--results", str(results)]) == 0
    (row,) = _result(tmp_path)["extend_32k"]["numbers"]
    assert row["exit code"] == 0 and len(row["losses"]) == 3
    text = results.read_text()
    assert "## Other\n\nkept" in text and "## GPU node check: CPU" in text


def test_a_failing_section_does_not_stop_the_next(tmp_path, monkeypatch):
    def broken(opts, sec):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def fine(opts, sec):
        sec.add({"x": 1}, ok=True)

    monkeypatch.setitem(gpu.SECTIONS, "kernels", ("broken", broken))
    monkeypatch.setitem(gpu.SECTIONS, "ring", ("fine", fine))
    assert gpu.main(["--device", "cpu", "--no-isolate", "--sections", "kernels", "ring", "--out", str(tmp_path)]) == 1
    sections = _result(tmp_path)
    assert sections["kernels"]["status"] == "error"
    assert sections["kernels"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert sections["ring"]["status"] == "pass"


def test_splice_replaces_the_devices_section_only(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## A\n\na\n\n## GPU node check: X (`bench/gpu.py`)\n\nold\n\n## B\n\nb\n")
    gpu.splice(results, "## GPU node check: X (`bench/gpu.py`)\n\nnew\n")
    assert results.read_text() == "# R\n\n## A\n\na\n\n## GPU node check: X (`bench/gpu.py`)\n\nnew\n\n## B\n\nb\n"
    gpu.splice(results, "## GPU node check: Y (`bench/gpu.py`)\n\ny\n")
    assert results.read_text().endswith("## B\n\nb\n\n## GPU node check: Y (`bench/gpu.py`)\n\ny\n")
    assert gpu.largest_cp(32768, 1) == 1 and gpu.largest_cp(32768, 8) == 8 and gpu.largest_cp(32768, 3) == 2
