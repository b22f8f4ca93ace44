"""Needle grid and loss by position: teacher-forced scoring equals greedy decoding, exact
placement, evaluation-only keys, and the JSON/PNG outputs (including the CLI on a checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longtrain.config import ModelConfig, RopeConfig
from longtrain.data.retrieval import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, Haystack, depth_index, key_split
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.eval import needle, position_loss
from longtrain.model import load
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import IGNORE_INDEX
from tests.checkpoint_utils import tiny_checkpoint

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("needle")

TOK = ByteTokenizer()
LENGTH = 320  # just above the passkey template (~260 tokens)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1)
    return Transformer(cfg, RopeConfig(), TOK.vocab_size).double().eval()


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    text = "for i in range(10):\n    total += values[i] * 3\n"
    doc = [TOK.bos_id, *TOK.encode(text), TOK.eos_id]
    return Haystack(np.asarray(doc * 100, dtype=np.uint16), (TOK.bos_id, TOK.eos_id, TOK.pad_id), TOK.vocab_size)


def test_teacher_forced_score_equals_greedy_decoding(haystack):
    model = load.scorer(tiny_model(), 64)  # the projection 64 tokens at a time: several chunks
    cells = [(d, t) for d in (0.0, 0.5, 1.0) for t in range(2)]
    batch = needle.needle_batch(TOK, haystack, LENGTH, cells, seed=0)
    labels = batch["labels"]
    n_answer = int((labels[0] != IGNORE_INDEX).sum())
    full = torch.cat([batch["input_ids"], labels[:, -1:]], dim=1)  # the seq_len + 1 tokens
    answer_start = LENGTH + 1 - n_answer

    # Half the samples get the model's own greedy continuation as their answer (so they must
    # be recalled), half keep the true key or get it with one token changed (a random model
    # misses those). Scoring must agree with real decoding on every one.
    for b in range(len(cells)):
        prompt = full[b, :answer_start]
        if b % 2 == 0:
            full[b, answer_start:] = torch.tensor(needle.greedy_decode(model, prompt, n_answer))
            if b == 2:  # right first tokens, wrong last one
                full[b, -1] = (full[b, -1] + 1) % 256
    batch = {**batch, "input_ids": full[:, :-1], "labels": torch.where(labels != IGNORE_INDEX, full[:, 1:], labels)}
    scored = needle.score_batch(model, batch)
    expected = [needle.greedy_decode(model, full[b, :answer_start], n_answer) == full[b, answer_start:].tolist() for b in range(len(cells))]
    assert scored.tolist() == expected
    assert expected[0] and expected[4] and not expected[2]


@pytest.mark.parametrize("length", [LENGTH, 600])
def test_eval_batch_places_needle_at_requested_depth(haystack, length):
    depths = [0.0, 0.5, 1.0]
    batch = needle.needle_batch(TOK, haystack, length, [(d, 0) for d in depths], seed=1)
    assert batch["input_ids"].shape == (3, length)
    head = 1 + len(TOK.encode(PASSKEY_INTRO))
    question = len(TOK.encode(PASSKEY_QUESTION))
    for row, depth in enumerate(depths):
        labels = batch["labels"][row]
        key = TOK.decode(labels[labels != IGNORE_INDEX])
        assert key_split(key) == "val"  # evaluation keys only
        needle_ids = TOK.encode(PASSKEY_NEEDLE.format(key=key))
        n_hay = length + 1 - head - len(needle_ids) - question - len(key)
        start = head + depth_index(depth, n_hay)
        assert batch["input_ids"][row, start : start + len(needle_ids)].tolist() == needle_ids


def test_grid_writes_json_table_and_heatmap(haystack, tmp_path):
    model = load.scorer(tiny_model(), 64)  # the projection 64 tokens at a time: several chunks
    grid = needle.run_needle_grid(model, TOK, haystack, [LENGTH, 400], depths=[0.0, 0.5, 1.0], trials=2, batch_size=4)
    assert len(grid.recall) == 2 and all(len(row) == 3 for row in grid.recall)
    assert all(0.0 <= r <= 1.0 for row in grid.recall for r in row)
    assert "mean" in grid.table() and str(LENGTH) in grid.table()
    json_path, png_path = needle.write_results(grid, tmp_path)
    record = json.loads(json_path.read_text())
    assert record["lengths"] == [LENGTH, 400] and set(record["mean_recall"]) == {str(LENGTH), "400"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_position_loss_uses_single_document_windows(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [50, 300, 40, 700]  # only the 2nd and 4th documents hold a 257-token window
    docs = [np.concatenate([[TOK.bos_id], rng.integers(0, 256, n - 2), [TOK.eos_id]]) for n in lengths]
    tokens = np.concatenate(docs).astype(np.uint16)
    doc_starts = np.concatenate([[0], np.cumsum(lengths[:-1])])
    starts = position_loss.document_windows(tokens, doc_starts, 256, max_windows=10)
    assert starts == [50, 390, 646]
    result = position_loss.position_loss(load.scorer(tiny_model(), 64), tokens, doc_starts, 256, num_buckets=8, batch_size=2)
    assert result.windows == 3 and len(result.loss) == 8 and result.bucket_starts[:2] == [0, 32]
    assert all(np.isfinite(result.loss))
    json_path, png_path = position_loss.write_results(result, tmp_path)
    assert json.loads(json_path.read_text())["seq_len"] == 256 and png_path.stat().st_size > 0
    with pytest.raises(ValueError, match="no validation document"):
        position_loss.document_windows(tokens, doc_starts, 1000, 10)


def test_cli_rebuilds_model_from_checkpoint(tmp_path, monkeypatch, capsys):
    path, model = tiny_checkpoint(tmp_path / "ckpts", LENGTH)
    needle.main([str(path), "--depths", "0", "100", "--trials", "1", "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "needle.json").read_text())
    assert record["lengths"] == [LENGTH] and record["depths"] == [0.0, 1.0]
    assert (tmp_path / "out" / "needle.png").is_file()
    assert "mean" in capsys.readouterr().out
    # Weights were loaded, not re-initialised.
    loaded, _, _, _ = load.load_model(path)
    assert torch.equal(loaded.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)
    position_loss.main([str(path), "--buckets", "4", "--windows", "2", "--out", str(tmp_path / "by_position")])
    by_position = json.loads((tmp_path / "by_position" / "position_loss.json").read_text())
    assert by_position["seq_len"] == LENGTH and len(by_position["loss"]) == 4


@pytest.mark.parametrize("lengths", [[2048], [512, 2048, 8192]])
def test_heatmap_labels_and_title_fit_in_the_picture(tmp_path, monkeypatch, lengths):
    """Every text of needle.png (title, axis labels, ticks, cells, colorbar) lies inside the saved picture."""
    from matplotlib.figure import Figure

    from longtrain.eval.grid import NeedleGrid, save_heatmap

    outside: list[str] = []
    shown: list[str] = []
    real_savefig = Figure.savefig

    def savefig(fig: Figure, *args, **kwargs) -> None:
        real_savefig(fig, *args, **kwargs)
        fig.canvas.draw()  # the saved layout again, at the figure's own dpi, so every extent is in one unit
        renderer, (width, height) = fig.canvas.get_renderer(), fig.canvas.get_width_height()
        for text in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() and a.get_visible()):
            box = text.get_window_extent(renderer)
            shown.append(text.get_text())
            if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
                outside.append(text.get_text())

    monkeypatch.setattr(Figure, "savefig", savefig)
    grid = NeedleGrid("passkey", lengths, list(needle.DEFAULT_DEPTHS), 4, [[0.5] * 11 for _ in lengths])
    save_heatmap(grid, tmp_path / "needle.png")
    assert "context length (tokens)" in shown and "passkey recall, 4 trials per cell" in shown
    assert outside == []
