"""Hugging Face in and out, against transformers itself (fp32, offline).

Export: every RoPE type and all three architectures give transformers' logits past the
original length; safetensors shard; greedy ``generate`` decodes what our model decodes;
the needle CLI on an export gives the checkpoint's grid; logn attention is refused.
Import: random Qwen3 / Llama / SmolLM3 models load with ``stage.init_from=hf:`` at cp=1,
cp=2 and dp=2 with transformers' logits, then train; import → train → export → import is
bitwise; mismatches and unsupported architectures stop in one line with exit code 2.
"""

from __future__ import annotations

import json
import random
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from longtrain import checkpoint as ckpt
from longtrain import hf
from longtrain.config import ConfigError
from longtrain.curriculum import compose_stage_configs, run_gated_stage
from longtrain.data.retrieval import build_haystack
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.data.tokenizer_export import save_tokenizer
from longtrain.eval import needle
from longtrain.export import export_checkpoint, export_model, main as export_main
from longtrain.hf import hf_name
from longtrain.model import load
from longtrain.optim.loss import TokenScores
from longtrain.parallel.mesh import init_parallel
from longtrain.run_config import check_config, load_config
from longtrain.trainer.builder import build_trainer, prepare_trainer
from longtrain.trainer.trainer import Trainer
from tests.conftest import CONFIG_DIR
from tests.cli_utils import ROOT, run_main, train_in_process
from tests.dist_utils import run_distributed
from tests.test_trainer import TINY, losses, single_process

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("hf")

SHORT = ["rope.original_max_position_embeddings=16", "logging.progress=false", "eval.val_every=0"]


def make_config(*overrides: str, base: tuple[str, ...] = (*TINY, *SHORT)):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return load_config(compose(config_name="config", overrides=[*base, *overrides]))


def trained_checkpoint(run_dir: Path, *overrides: str, steps: int = 3) -> tuple[Trainer, Path]:
    """A few steps at 64 tokens with a 16-token original length: RoPE scaled ×4."""
    trainer = build_trainer(make_config(f"run.dir={run_dir}", *overrides), single_process())
    for _ in range(steps):
        trainer.train_step()
    return trainer, trainer.save()


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits


def hf_scores(folder: Path, ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    """What a ScoreFn returns, from transformers' full logits (the reference; test-sized)."""
    logits = hf_logits(folder, ids)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return TokenScores(loss, logits.argmax(dim=-1))


def assert_scores_close(got: TokenScores, expected: TokenScores) -> None:
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax, expected.argmax)


def our_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))


# -- export ------------------------------------------------------------------------------


def test_byte_tokenizer_export_has_our_ids(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(make_config().tokenizer, tmp_path)
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True), ByteTokenizer()
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs)) == (256, 257, 258, 259)
    rng = random.Random(0)
    alphabets = [
        [chr(c) for c in range(32, 127)] + ["\n", "\t", " "],  # ASCII
        list("àáâãäåçèéêëìíîïñòóôõöùúûüýÿßœæÀÉÎÕÜ"),  # accented letters
        [chr(c) for c in range(0x4E00, 0x4E00 + 500)] + [chr(c) for c in range(0x3040, 0x30A0)],  # CJK, kana
        [chr(c) for c in range(0x1F600, 0x1F650)] + ["👍🏽", "👨‍👩‍👧", "🇫🇷"],  # emoji, modifiers, ZWJ, flags
    ]
    texts = ["x<eos>y<bos>", ""]  # special tokens' text is plain text, as in ours
    while len(texts) < 1000:
        texts.append("".join(rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(1, 40))))
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids, skip_special_tokens=True) == text
    assert theirs.decode([256, 104, 105, 257], skip_special_tokens=True) == ours.decode([256, 104, 105, 257])


@pytest.mark.parametrize(
    "overrides,architecture",
    [
        (["rope=yarn"], "Qwen3ForCausalLM"),
        (["rope=default"], "Qwen3ForCausalLM"),
        (["rope=abf", "rope.logn_attention=false", "stage.abf_theta=40000"], "Qwen3ForCausalLM"),
        (["rope=linear", "model.tie_embeddings=true"], "Qwen3ForCausalLM"),
        (["rope=dynamic", "model.qk_norm=false"], "LlamaForCausalLM"),
        (["rope=llama3", "model.qk_norm=false", "model.n_kv_heads=1"], "LlamaForCausalLM"),
        (["rope=yarn", "model.qk_norm=false", "model.nope_every=2"], "SmolLM3ForCausalLM"),
    ],
)
def test_export_logits_equal_transformers_past_the_original_length(tmp_path, overrides, architecture):
    trainer, path = trained_checkpoint(tmp_path, *overrides)
    out = export_checkpoint(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    ids = torch.randint(0, 259, (2, 96), generator=torch.Generator().manual_seed(0))
    ours, theirs = our_logits(trainer.model, ids), hf_logits(out, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[:, 16:], our_logits(trainer.model, ids[:, :16].repeat(1, 6))[:, 16:])  # positions matter


def test_export_cli_shards_and_writes_generation_config(tmp_path):
    trainer, path = trained_checkpoint(tmp_path, "rope=yarn")
    export_main([str(path), str(tmp_path / "hf"), "--max-shard-size", "100KB"])
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == {hf_name(k) for k in trainer.model.state_dict()}
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (256, 257, 258)
    ids = torch.randint(0, 259, (1, 80), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf_logits(out, ids), our_logits(trainer.model, ids), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def yarn_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("yarn_export")
    # The stage length holds a passkey prompt (~260 tokens): 20× the original length.
    trainer, path = trained_checkpoint(tmp, "rope=yarn", "stage.seq_len=320", "stage.global_batch_size=1",
                                       "stage.micro_batch_size=1", steps=8)
    return trainer, path, export_checkpoint(path, tmp / "hf")


def test_export_check_generate_decodes_what_our_evaluator_does(yarn_export, tmp_path, capsys):
    """--check: transformers' logits past the original length and greedy generate (KV cache)
    on passkey prompts against ours; it exits 1 on any difference."""
    _, path, _ = yarn_export
    export_main([str(path), str(tmp_path / "hf"), "--check"])
    printed = capsys.readouterr().out
    assert "loss at positions 16..318" in printed and "4/4 prompts decode the digits ours does" in printed, printed


def test_needle_cli_on_export_gives_the_checkpoint_grid(yarn_export, tmp_path):
    trainer, path, out = yarn_export
    # What the CLI runs on hf:OUT: the exported tokenizer builds the same haystack, and
    # transformers' forward gives our logits on needle samples.
    score, cfg, tokenizer, _ = load.load_hf_model(out)
    haystack = build_haystack(cfg, tokenizer, "val")
    assert (haystack.tokens == build_haystack(cfg, trainer.evaluator.tokenizer, "val").tokens).all()
    batch = needle.needle_batch(tokenizer, haystack, 320, [(0.5, 0), (1.0, 1)], seed=0)
    ours = load.scorer(trainer.model.eval(), 64)(batch["input_ids"], batch["position_ids"], batch["labels"])
    assert_scores_close(score(batch["input_ids"], batch["position_ids"], batch["labels"]), ours)
    args = ["--lengths", "320", "--depths", "0", "50", "100", "--trials", "2", "--kind", "passkey"]
    needle.main([str(path), *args, "--out", str(tmp_path / "ours")])
    needle.main([f"hf:{out}", *args, "--out", str(tmp_path / "theirs")])
    ours, theirs = (json.loads((tmp_path / d / "needle.json").read_text()) for d in ("ours", "theirs"))
    assert theirs["recall"] == ours["recall"]


def test_export_refuses_logn_attention_in_one_line(tmp_path):
    _, path = trained_checkpoint(tmp_path, "rope=abf", steps=1)  # rope=abf turns logn attention on
    result = run_main(export_main, [str(path), str(tmp_path / "hf")], ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "logn" in lines[0] and "rope=yarn" in lines[0], result.stderr
    assert not any(p.name.startswith("hf") for p in tmp_path.iterdir())


def test_export_cli_refuses_a_bad_shard_size_or_folder(tmp_path, capsys):
    _, path = trained_checkpoint(tmp_path, "rope=yarn", steps=1)
    for args, message in (([str(path), "--max-shard-size", "5 gigs"], "--max-shard-size: '5 gigs' is not a size"),
                          ([str(tmp_path)], "is not a complete checkpoint folder")):
        with pytest.raises(SystemExit) as exit_info:
            export_main([args[0], str(tmp_path / "hf"), *args[1:]])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError, match="export.max_shard_size"):
        make_config("export.max_shard_size=huge")


def test_nope_with_qk_norm_is_refused_before_training():
    with pytest.raises(ConfigError, match="model.nope_every: no transformers class"):
        make_config("rope=yarn", "model.nope_every=2", "export.after_gate=true")


def test_after_gate_exports_the_gated_stage(tmp_path):
    cfg = make_config(
        f"run.dir={tmp_path}", "rope=yarn", "stage.steps=2", "export.after_gate=true", "gate.min_recall=0", "gate.min_cell_recall=0",
        "gate.depths=[0.5]", "gate.trials=1", "gate.short_val_samples=2", "eval.position_buckets=0", "gate.report_tasks=[]",
        "stage.seq_len=320", "stage.global_batch_size=1", "stage.micro_batch_size=1",
    )
    record = run_gated_stage(cfg, single_process(), None)
    out = tmp_path / cfg.stage.name / "hf"
    assert record.passed and (tmp_path / cfg.stage.name / "gate.json").is_file()
    trainer = build_trainer(cfg, single_process())
    ckpt.load_checkpoint(Path(record.checkpoint), trainer.model)
    ids = torch.randint(0, 259, (1, 64), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(out, ids), our_logits(trainer.model, ids), rtol=1e-5, atol=1e-5)


# -- import ------------------------------------------------------------------------------

ARCHITECTURES = {
    # GQA 2:1, QK-norm, tied
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    # GQA 4:1, untied, no QK-norm
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    # NoPE on every 2nd layer
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"num_key_value_heads": 2, "no_rope_layer_interval": 2, "tie_word_embeddings": False}),
}
OVERRIDES = {
    "qwen3": ["model.n_kv_heads=2", "model.tie_embeddings=true"],
    "llama": ["model.n_kv_heads=1", "model.qk_norm=false"],
    "smollm3": ["model.n_kv_heads=2", "model.qk_norm=false", "model.nope_every=2"],
}
SEQ = 300


def random_hf_model(folder: Path, name: str, seed: int = 0) -> Path:
    """A random small model saved with save_pretrained; norm weights random too, so that a
    mis-mapped norm cannot pass."""
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
        rms_norm_eps=1e-6, max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=256, eos_token_id=257, pad_token_id=258, **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    save_tokenizer(make_config().tokenizer, folder)  # the byte tokenizer, for tokenizer=hf
    return folder


def import_overrides(folder: Path, name: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"stage.init_from=hf:{folder}", f"run.dir={run_dir}", "rope=default", "model.dim=64", "model.n_layers=4",
        "model.n_heads=4", "model.ffn_dim=160", *OVERRIDES[name], "stage.steps=5", *extra,
    ]


def fixed_ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, SEQ), generator=torch.Generator().manual_seed(0))


def fixed_labels() -> torch.Tensor:
    return torch.randint(0, 259, (2, SEQ), generator=torch.Generator().manual_seed(1))


def evaluator_scores(trainer: Trainer, ids: torch.Tensor) -> TokenScores:
    return trainer.evaluator.score_fn()(ids, torch.arange(SEQ).expand(2, -1), fixed_labels())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_import_equals_transformers_then_trains(tmp_path, name):
    folder = random_hf_model(tmp_path / name, name)
    cfg = make_config(*import_overrides(folder, name, tmp_path / "run"))
    trainer = prepare_trainer(cfg, single_process(), Path(cfg.stage.init_from))
    ids = fixed_ids()
    assert_scores_close(evaluator_scores(trainer, ids), hf_scores(folder, ids, fixed_labels()))
    result = trainer.fit()
    assert result.step == 5 and sorted(losses(result.stage_dir)) == [1, 2, 3, 4, 5]


def test_model_hf_and_tokenizer_hf_take_everything_from_the_folder(tmp_path):
    folder = random_hf_model(tmp_path / "smollm3", "smollm3")
    model_free = tuple(o for o in (*TINY, *SHORT) if not o.startswith("model."))  # model=hf has no such keys
    cfg = make_config("model=hf", f"model.hf_path={folder}", f"stage.init_from=hf:{folder}", "tokenizer=hf",
                      f"tokenizer.path={folder}", "rope=default", f"run.dir={tmp_path / 'run'}", base=model_free)
    assert (cfg.model.n_layers, cfg.model.nope_every, cfg.model.qk_norm, cfg.model.ffn_dim) == (4, 2, False, 160)
    trainer = prepare_trainer(cfg, single_process(), Path(cfg.stage.init_from))
    ids = fixed_ids()
    assert_scores_close(evaluator_scores(trainer, ids), hf_scores(folder, ids, fixed_labels()))
    # The needle CLI on a folder from elsewhere (no longtrain.yaml): default run config, its tokenizer.
    score, default_cfg, tokenizer, _ = load.load_hf_model(folder)
    assert default_cfg.stage.seq_len == 512 and tokenizer.vocab_size == 259
    assert_scores_close(score(ids, torch.arange(SEQ).expand(2, -1), fixed_labels()), hf_scores(folder, ids, fixed_labels()))
    # Exported again, the folder's own tokenizer goes along.
    from transformers import AutoTokenizer

    out = export_checkpoint(trainer.save(), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["no_rope_layers"] == [1, 0, 1, 0]
    assert AutoTokenizer.from_pretrained(out)("héllo 👍")["input_ids"] == AutoTokenizer.from_pretrained(folder)("héllo 👍")["input_ids"]


def test_import_train_export_import_is_bitwise(tmp_path):
    folder = random_hf_model(tmp_path / "qwen3", "qwen3")
    cfg = make_config(*import_overrides(folder, "qwen3", tmp_path / "run"))
    result = prepare_trainer(cfg, single_process(), Path(cfg.stage.init_from)).fit()
    trained = build_trainer(cfg, single_process()).model
    ckpt.load_checkpoint(result.checkpoint, trained)
    out = export_checkpoint(result.checkpoint, tmp_path / "hf")
    again = make_config(*import_overrides(out, "qwen3", tmp_path / "again"))
    reimported = prepare_trainer(again, single_process(), Path(again.stage.init_from)).model
    before, after = trained.state_dict(), reimported.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    from safetensors.torch import load_file

    assert not torch.equal(before["norm.weight"], load_file(folder / "model.safetensors")["model.norm.weight"])  # trained


class FullTensorsAlive:
    """Wraps hf.read_tensor: the most tensors it returned that were alive at the same time."""

    def __init__(self) -> None:
        self.read, self.alive, self.most = hf.read_tensor, 0, 0

    def __call__(self, file: Path, name: str) -> torch.Tensor:
        tensor = self.read(file, name)
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(tensor, self._freed)
        return tensor

    def _freed(self) -> None:
        self.alive -= 1


def _import_worker(rank: int, world_size: int, folder: str, tmp: str, dp: int, cp: int) -> None:
    name = Path(folder).name
    cfg = make_config(*import_overrides(Path(folder), name, Path(tmp) / f"dp{dp}cp{cp}"), f"parallel.dp={dp}", f"parallel.cp={cp}")
    pd = init_parallel(cfg.parallel, torch.device("cpu"))
    hf.read_tensor = counter = FullTensorsAlive()
    trainer = prepare_trainer(cfg, pd, Path(cfg.stage.init_from))
    assert counter.most == 1, f"rank {rank} held {counter.most} full tensors at once"
    assert counter.alive == 0
    scores = evaluator_scores(trainer, fixed_ids())
    result = trainer.fit()
    trained_scores = evaluator_scores(trainer, fixed_ids())
    export_model(trainer.model, cfg, Path(tmp) / "hf_live")  # export.after_gate's path: gathered from the shards
    if rank == 0:
        torch.save({"scores": tuple(scores), "trained_scores": tuple(trained_scores), "checkpoint": str(result.checkpoint)}, Path(tmp) / "out.pt")


@pytest.mark.e2e  # training on spawned gloo ranks, then an export: the slowest of this file
@pytest.mark.parametrize("name,dp,cp", [("smollm3", 1, 2), ("qwen3", 2, 1)])
def test_import_under_fsdp_and_cp_then_export_the_sharded_checkpoint(tmp_path, name, dp, cp):
    folder = random_hf_model(tmp_path / name, name)
    run_distributed(_import_worker, dp * cp, str(folder), str(tmp_path), dp, cp, timeout=240)
    got = torch.load(tmp_path / "out.pt")
    assert_scores_close(TokenScores(*got["scores"]), hf_scores(folder, fixed_ids(), fixed_labels()))
    assert sorted(losses(tmp_path / f"dp{dp}cp{cp}" / "pretrain")) == [1, 2, 3, 4, 5]
    # The checkpoint the two ranks saved exports in one process, with the trained model's logits.
    out = export_checkpoint(Path(got["checkpoint"]), tmp_path / "hf")
    for folder in (out, tmp_path / "hf_live"):
        assert_scores_close(TokenScores(*got["trained_scores"]), hf_scores(folder, fixed_ids(), fixed_labels()))


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny model's short run and these overrides, in this process."""
    return train_in_process(*TINY, *SHORT, *overrides, cwd=ROOT)


def test_config_mismatch_is_one_line_naming_the_keys(tmp_path):
    folder = random_hf_model(tmp_path / "llama", "llama")
    overrides = import_overrides(folder, "llama", tmp_path / "run")
    result = run_train(*overrides, "model.n_kv_heads=2", "model.qk_norm=true", "rope.theta=500000")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for key in ("model.n_kv_heads=2 (hf 1)", "model.qk_norm=True (hf False)", "rope.theta=500000.0 (hf rope_theta=10000.0)", "model=hf"):
        assert key in lines[0], lines[0]


def test_unsupported_architecture_is_one_line_listing_the_supported(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "qwen2")
    result = run_train(f"stage.init_from=hf:{tmp_path / 'qwen2'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Qwen2ForCausalLM" in lines[0], result.stderr
    assert "supported: Qwen3ForCausalLM, LlamaForCausalLM, SmolLM3ForCausalLM" in lines[0]


def test_readme_extend_command_validates_every_stage(tmp_path):
    """README: python train.py preset=cpu_demo stage=cpu/extend_2k model=hf model.hf_path=PATH
    stage.init_from=hf:PATH tokenizer=hf tokenizer.path=PATH (train.py validates every stage)."""
    folder = random_hf_model(tmp_path / "qwen3", "qwen3")
    overrides = ["preset=cpu_demo", "model=hf", f"model.hf_path={folder}", f"stage.init_from=hf:{folder}", "tokenizer=hf", f"tokenizer.path={folder}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        stages = compose_stage_configs(["stage=cpu/extend_2k", *overrides])
    for cfg in stages:
        check_config(cfg, world_size=1)
        assert (cfg.model.n_layers, cfg.model.n_kv_heads, cfg.model.tie_embeddings, cfg.tokenizer.path) == (4, 2, True, str(folder))
    assert [c.rope.factor for c in stages] == [1.0, 1.0, 4.0, 16.0]  # yarn on top of the imported plain RoPE


def test_supported_class_with_a_feature_we_lack_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=1, attention_bias=True)).save_pretrained(tmp_path / "biased")
    with pytest.raises(ConfigError, match=r"^stage.init_from: .*config.json has attention_bias=true, which longtrain's model cannot express$"):
        make_config(*import_overrides(tmp_path / "biased", "llama", tmp_path / "run"))
