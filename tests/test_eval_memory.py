"""Evaluation never forms [T, vocab] logits (issue 27): the needle grid, loss by position and
the suite read per-token scores computed on each rank's shard, and at cp=2 those equal one
rank's, and equal what full logits give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from longtrain.eval import position_loss
from longtrain.eval.needle import run_needle_grid
from longtrain.optim.loss import IGNORE_INDEX, token_scores
from tests.dist_utils import run_distributed
from tests.test_tasks import LENGTH, TOK, code_haystack, cp_config

CHUNK = 64  # loss chunk: well below LENGTH / cp, so a [T, vocab] projection would stand out
EXTRA = (f"optim.loss_chunk_size={CHUNK}",)


class LargestLogits(TorchFunctionMode):
    """The most elements of any tensor with a vocabulary-sized last dimension (logits, or
    anything made from them) that a torch function returned while active."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.most = vocab_size, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab_size]
        self.most = max([self.most, *sizes])
        return out


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, LENGTH), generator=g)
    labels = torch.randint(0, 256, (2, LENGTH), generator=g)
    labels[0, ::3] = IGNORE_INDEX  # some tokens unlabelled: neither projected nor scored
    return ids, torch.arange(LENGTH).expand(2, -1), labels


def documents() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = [LENGTH + 10, 2 * LENGTH + 5]
    docs = [np.concatenate([[TOK.bos_id], rng.integers(0, 256, n - 1)]) for n in lengths]
    return np.concatenate(docs).astype(np.uint16), np.array([0, lengths[0]])


def evaluate(trainer) -> dict:
    """Scores of a fixed batch, a needle grid and loss by position, under the spy."""
    score = trainer.evaluator.score_fn()
    tokens, doc_starts = documents()
    with trainer.evaluator.eval_mode(), LargestLogits(TOK.vocab_size) as spy:
        scores = score(*fixed_batch())
        grid = run_needle_grid(score, TOK, code_haystack(), [LENGTH], [0.0, 0.5, 1.0], trials=2, batch_size=2)
        by_position = position_loss.position_loss(score, tokens, doc_starts, LENGTH, num_buckets=4, batch_size=2)
    return {"loss": scores.loss, "argmax": scores.argmax, "recall": grid.recall, "by_position": by_position.loss,
            "largest": spy.most}


def _cp_worker(rank: int, world_size: int, tmp: str) -> None:
    from longtrain.parallel.mesh import init_parallel
    from longtrain.trainer.builder import build_trainer

    cfg = cp_config(Path(tmp) / "cp2", 2, *EXTRA)
    result = evaluate(build_trainer(cfg, init_parallel(cfg.parallel, torch.device("cpu"))))
    if rank == 0:
        torch.save(result, Path(tmp) / "cp2.pt")


def test_token_scores_equal_full_logits_without_forming_them():
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(2, 300, 32, generator=g), torch.randn(259, 32, generator=g)
    labels = fixed_batch()[2][:, :300]
    with LargestLogits(259) as spy:
        scores = token_scores(h, weight, labels, CHUNK)
    assert spy.most <= CHUNK * 259 < 300 * 259
    logits = h @ weight.t()
    labelled = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(scores.loss, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(scores.argmax, torch.where(labelled, logits.argmax(-1), IGNORE_INDEX))


@pytest.mark.e2e
def test_evaluation_at_cp2_equals_one_rank_and_never_holds_t_by_vocab(tmp_path):
    from longtrain.trainer.builder import build_trainer
    from tests.test_trainer import single_process

    reference = evaluate(build_trainer(cp_config(tmp_path / "cp1", 1, *EXTRA), single_process()))
    run_distributed(_cp_worker, 2, str(tmp_path), timeout=240)
    got = torch.load(tmp_path / "cp2.pt")
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["argmax"], reference["argmax"])
    assert got["recall"] == reference["recall"]
    np.testing.assert_allclose(got["by_position"], reference["by_position"], rtol=1e-5)
    # At most one chunk of logits at a time, on one rank or two: never [T, vocab].
    assert reference["largest"] == got["largest"] == CHUNK * TOK.vocab_size
