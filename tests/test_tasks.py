"""The RULER-style tasks and their suite: formats, a solver that reads each answer off the
text (a perfect model) scores 1.0 and a random forward 0, evaluation keys never appear
in training samples, the suite's table / JSON / plot and CLI, and the same results at
cp=2 as at cp=1 through the function the gate uses."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain.config import RetrievalConfig
from longtrain.data.retrieval import Haystack, RetrievalDataset, key_split, retrieval_sample
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.eval import suite
from longtrain.eval.needle import needle_batch
from longtrain.optim.loss import IGNORE_INDEX, TokenScores
from tests.checkpoint_utils import tiny_checkpoint
from tests.dist_utils import run_distributed

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("tasks")

TOK = ByteTokenizer()
TASKS = ("passkey", "kv", "multikey", "multiquery", "multivalue", "vartrack", "cwe")
LENGTH = 640  # every task fits (vartrack, the longest template, needs ~380 tokens)


def code_haystack() -> Haystack:
    text = "for i in range(10):\n    total += values[i] * 3\n"
    doc = [TOK.bos_id, *TOK.encode(text), TOK.eos_id]
    return Haystack(np.asarray(doc * 100, dtype=np.uint16), (TOK.bos_id, TOK.eos_id, TOK.pad_id), TOK.vocab_size)


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    return code_haystack()


# -- a solver: each task's answer read off the text, as a perfect model would ----------

QUESTIONS = {  # the last question of each kind, its answer starting right after the match
    "passkey": r"What is the pass key\? The pass key is ",
    "kv": r"What is the value of (\w+)\? The value of \w+ is ",
    "multikey": r"What is the value of (\w+)\? The value of \w+ is ",
    "multiquery": r"What are the values of ([\w, ]+)\? The values of [\w, ]+ are ",
    "multivalue": r"What are all the special values for (\w+), in the order they appear\? They are ",
    "vartrack": r"assigned the value (\d+) in the text above\. Answer: in the order they are assigned, they are ",
    "cwe": r"What are the (\d+) most common words in the list above, in the order they first appear\? Answer: they are ",
}


def solve(kind: str, text: str) -> tuple[int, str]:
    """(where the answer starts, the answer) from a sample's text up to its answer."""
    q = list(re.finditer(QUESTIONS[kind], text))[-1]
    context, arg = text[: q.start()], q.group(1) if q.groups() else None
    if kind == "passkey":
        answer = re.search(r"The pass key is (\d+)\. Remember it", context).group(1)
    elif kind in ("kv", "multikey"):
        answer = re.search(rf"The value of {arg} is (\d+)\.", context).group(1)
    elif kind == "multiquery":
        answer = ", ".join(re.search(rf"The value of {k} is (\d+)\.", context).group(1) for k in arg.split(", "))
    elif kind == "multivalue":
        answer = ", ".join(re.findall(rf"One of the special values for {arg} is (\d+)\.", context))
    elif kind == "vartrack":
        chain = [re.search(rf"VAR (\w+) = {arg}\n", context).group(1)]
        while (nxt := re.search(rf"VAR (\w+) = VAR {chain[-1]}\n", context)) is not None:
            chain.append(nxt.group(1))
        answer = ", ".join(chain)
    else:  # cwe: the most frequent words, in order of first appearance
        words = re.findall(r"[a-z]+", context.split("appear most often.\n", 1)[1])
        top = {w for w, _ in Counter(words).most_common(int(arg))}
        answer = ", ".join(dict.fromkeys(w for w in words if w in top))
    return q.end(), answer


def solver_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """One-hot logits of the solver's answer at the positions that predict it."""
    logits = torch.zeros(*input_ids.shape, TOK.vocab_size, dtype=torch.float64)
    for b, row in enumerate(input_ids.tolist()):
        text = "".join(chr(t) if t < 256 else "\0" for t in row)  # byte tokens: char i = token i
        kind = next(k for k in QUESTIONS if re.search(QUESTIONS[k], text) and k not in ("kv",))
        start, answer = solve(kind, text)
        for i, ch in enumerate(answer.encode()):
            logits[b, start - 1 + i, ch] = 1.0
    return logits


def scores_of(logits: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    """A ScoreFn's answer from test-sized logits (argmax only; the suite reads nothing else)."""
    labelled = labels != IGNORE_INDEX
    return TokenScores(torch.zeros(labels.shape), torch.where(labelled, logits.argmax(dim=-1), IGNORE_INDEX))


def perfect_forward(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    return scores_of(solver_logits(input_ids), labels)


def random_forward(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    g = torch.Generator().manual_seed(int(input_ids.sum()))
    return scores_of(torch.randn(*input_ids.shape, TOK.vocab_size, generator=g), labels)


# -- formats ------------------------------------------------------------------------------


def answer_text(s) -> list[str]:
    return [TOK.decode(s.tokens[a:b].tolist()) for a, b in s.answer_spans]


@pytest.mark.parametrize("kind", TASKS)
def test_sample_format_answer_and_determinism(haystack, kind):
    cfg = RetrievalConfig()
    s = retrieval_sample(cfg, TOK, haystack, np.random.default_rng([3, 7]), LENGTH, "val", kind, depth=0.5)
    again = retrieval_sample(cfg, TOK, haystack, np.random.default_rng([3, 7]), LENGTH, "val", kind, depth=0.5)
    assert np.array_equal(s.tokens, again.tokens)  # a pure function of the seed
    assert len(s.tokens) == LENGTH + 1 and s.kind == kind and s.tokens[0] == TOK.bos_id
    # Loss on exactly the answer, which ends the sample and is what the text determines.
    assert s.loss_mask.sum() == sum(b - a for a, b in s.answer_spans) and s.answer_spans[-1][1] == LENGTH + 1
    text = "".join(chr(t) if t < 256 else "\0" for t in s.tokens[:-1].tolist())
    start, solved = solve(kind, text)
    assert s.answer_spans[-1][0] == start and answer_text(s)[-1] == solved
    parts = solved.split(", ")
    expected_parts = {"multiquery": cfg.multi_queries, "multivalue": cfg.multi_values,
                      "vartrack": cfg.vartrack_hops + 1, "cwe": cfg.cwe_words}.get(kind, 1)
    assert len(parts) == expected_parts and len(set(parts)) == len(parts)
    if kind == "multivalue":  # the first value sits at the requested depth
        assert s.needle_starts[0] == min(s.needle_starts) and len(s.needle_starts) == cfg.multi_values
    if kind == "vartrack":  # one needle per assignment, in chain order through the text
        assert len(s.needle_starts) == cfg.vartrack_chains * (cfg.vartrack_hops + 1)
        assert s.needle_starts[: cfg.vartrack_hops + 1] == sorted(s.needle_starts[: cfg.vartrack_hops + 1])
    if kind == "cwe":
        listed = Counter(re.findall(r"[a-z]+", text.split("appear most often.\n", 1)[1].split("\nQuestion")[0]))
        assert all(listed[w] > 3 for w in parts) and sorted(listed.values())[-len(parts) - 1] <= 3


def test_vartrack_distractor_chains_and_sizes(haystack):
    cfg = RetrievalConfig(vartrack_chains=3, vartrack_hops=2, multi_values=2)
    s = retrieval_sample(cfg, TOK, haystack, np.random.default_rng(0), LENGTH, "val", "vartrack")
    text = TOK.decode(s.tokens.tolist())
    assert len(re.findall(r"VAR \w+ = \d+\n", text)) == 3 and len(re.findall(r"VAR \w+ = VAR", text)) == 6
    assert len(answer_text(s)[0].split(", ")) == 3
    with pytest.raises(ValueError, match="too short"):
        retrieval_sample(RetrievalConfig(), TOK, haystack, np.random.default_rng(0), 256, "val", "vartrack")
    with pytest.raises(ValueError, match="too short for a cwe sample"):
        retrieval_sample(RetrievalConfig(), TOK, haystack, np.random.default_rng(0), 160, "val", "cwe")


def test_training_and_evaluation_never_share_keys(haystack):
    cfg = RetrievalConfig(kinds=["multikey", "multiquery", "multivalue", "vartrack", "cwe"])
    train = RetrievalDataset(cfg, TOK, haystack, LENGTH, seed=0, split="train")
    keys = [k for i in range(25) for k in train.retrieval_sample(i).keys]
    assert {key_split(k) for k in keys} == {"train"}
    cells = [(d, t) for d in (0.0, 0.5, 1.0) for t in range(2)]
    for kind in cfg.kinds:
        batch = needle_batch(TOK, haystack, LENGTH, cells, seed=0, kind=kind)
        for labels in batch["labels"]:
            for part in TOK.decode(labels[labels != IGNORE_INDEX].tolist()).split(", "):
                assert key_split(part) == "val", (kind, part)


# -- scoring ------------------------------------------------------------------------------


def test_perfect_solver_scores_one_and_random_forward_zero(haystack):
    depths = [0.0, 0.3, 1.0]
    perfect = suite.run_suite(perfect_forward, TOK, haystack, TASKS, [LENGTH, 800], depths, trials=2, batch_size=3)
    assert {task: [g.recall_at(n) for n in g.lengths] for task, g in perfect.items()} == {t: [1.0, 1.0] for t in TASKS}
    chance = suite.run_suite(random_forward, TOK, haystack, TASKS, [LENGTH], depths, trials=2, batch_size=3)
    assert all(g.recall_at(LENGTH) == 0.0 for g in chance.values())  # 5+ answer tokens of 259 each


def test_suite_table_json_plot_and_cli(haystack, tmp_path, capsys):
    path, _ = tiny_checkpoint(tmp_path / "ckpts", LENGTH)
    # README: python -m longtrain.eval.suite CHECKPOINT --lengths ... --tasks ...
    suite.main([str(path), "--lengths", str(LENGTH), "700", "--tasks", "passkey", "vartrack", "cwe", "--depths", "0", "100",
                "--trials", "1", "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["task", "|", str(LENGTH), "700"] and [r.split()[0] for r in table[2:5]] == ["passkey", "vartrack", "cwe"]
    record = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert set(record["recall"]) == {"passkey", "vartrack", "cwe"} and set(record["recall"]["cwe"]) == {str(LENGTH), "700"}
    assert record["grids"]["vartrack"]["depths"] == [0.0, 1.0] and record["checkpoint"] == str(path)
    assert (tmp_path / "out" / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        suite.main([str(path), "--tasks", "riddle"])
    assert "invalid choice: 'riddle'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one line before any forward
        suite.main([str(path), "--tasks", "vartrack", "--lengths", "256"])
    assert "error: --tasks vartrack does not fit --lengths 256: seq_len=256 is" in capsys.readouterr().err


# -- cp=2 equals cp=1 -----------------------------------------------------------------------

CP_TASKS = ("passkey", "multikey", "vartrack")
CP_DEPTHS = [0.0, 0.5, 1.0]


def cp_config(run_dir: Path, cp: int, *extra: str):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR
    from longtrain.run_config import load_config
    from tests.test_trainer import TINY

    overrides = [*TINY, f"stage.seq_len={LENGTH}", f"run.dir={run_dir}", f"parallel.cp={cp}", "rope=yarn",
                 "rope.original_max_position_embeddings=256", "stage.global_batch_size=2", "stage.micro_batch_size=2", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return load_config(compose(config_name="config", overrides=overrides))


HINT_LOSS = 5.6  # nats; a random model's loss on a 259-token vocabulary is about ln 259 ≈ 5.56


def hinted_grids(trainer) -> dict:
    """The gate's suite through the trainer's (sharded) scores, with a hint: an answer token
    also counts as predicted where the random model's loss on it is below HINT_LOSS. Whether a
    sample counts as recalled then depends on the model's exact per-token losses at the
    answer positions, so a shard mix-up changes the result where a random model's zeros
    would not."""
    model_score = trainer.evaluator.score_fn()

    def forward(input_ids, position_ids, labels):
        scores = model_score(input_ids, position_ids, labels)
        return scores._replace(argmax=torch.where(scores.loss < HINT_LOSS, labels, scores.argmax))

    with trainer.evaluator.eval_mode():
        grids = suite.run_suite(forward, TOK, code_haystack(), CP_TASKS, [LENGTH], CP_DEPTHS, trials=3, batch_size=2)
    return {task: g.recall for task, g in grids.items()}


def _cp_worker(rank: int, world_size: int, tmp: str) -> None:
    from longtrain.parallel.mesh import init_parallel
    from longtrain.trainer.builder import build_trainer

    cfg = cp_config(Path(tmp) / "cp2", cp=2)
    trainer = build_trainer(cfg, init_parallel(cfg.parallel, torch.device("cpu")))
    recall = hinted_grids(trainer)
    if rank == 0:
        Path(tmp, "cp2.json").write_text(json.dumps(recall))


@pytest.mark.e2e
def test_suite_sharded_over_cp_equals_one_rank(tmp_path):
    from longtrain.trainer.builder import build_trainer
    from tests.test_trainer import single_process

    reference = hinted_grids(build_trainer(cp_config(tmp_path / "cp1", cp=1), single_process()))
    cells = [r for rows in reference.values() for r in rows[0]]
    assert 0 < np.mean(cells) < 1  # some recalled, some not: the comparison can fail
    run_distributed(_cp_worker, 2, str(tmp_path), timeout=240)
    assert json.loads((tmp_path / "cp2.json").read_text()) == reference
