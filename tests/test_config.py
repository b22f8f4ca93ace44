import pytest

from longtrain.config import ConfigError
from longtrain.run_config import check_config, load_config
from tests.cli_utils import ROOT, train_in_process


def test_defaults_and_presets_validate(compose_config):
    cfg = load_config(compose_config("stage=pretrain"))
    assert cfg.model.name == "125m" and cfg.stage.seq_len == 8192
    demo = load_config(compose_config("preset=cpu_demo", "stage=cpu/pretrain"))
    assert demo.model.name == "tiny" and demo.stage.seq_len == 512
    assert demo.curriculum.stages == ["cpu/induction", "cpu/pretrain", "cpu/extend_2k", "cpu/extend_8k"]
    for rope in ("default", "abf", "yarn", "linear", "dynamic", "llama3"):
        assert load_config(compose_config("stage=pretrain", f"rope={rope}")).rope.type == rope


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_heads=6", "model.n_heads"),  # not divisible by n_kv_heads=4
        ("model.head_dim=33", "model.head_dim"),  # odd head_dim
        ("rope.type=ntk_by_parts", "rope.type"),
        ("optim.lr=-0.1", "optim.lr"),
        ("data=local", "data.path"),  # missing path
        ("stage.decay_shape=exp", "stage.decay_shape"),
        ("model.dim=abc", "model.dim"),  # wrong type
        ("tokenizer=hf", "tokenizer.path"),
        ("parallel.cp=3", "stage.seq_len"),  # 8192 % 6 != 0
        ("stage.global_batch_size=7", "stage.global_batch_size"),
        ("run.resume=/no/such/ckpt", "run.resume"),
        ("gate.kind=riddle", "gate.kind"),
        ("retrieval.kinds=[passkey,riddle]", "retrieval.kinds"),
    ],
)
def test_bad_value_names_the_key(compose_config, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(compose_config("stage=pretrain", override))
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message


def test_a_stage_sets_its_gate_and_retrieval_mix(compose_config):
    """Stage files are global: the induction stage gates on its own kind and sizes, the
    stages after it get the defaults back; command-line overrides still win."""
    first = load_config(compose_config("preset=cpu_demo", "stage=cpu/induction"))
    assert first.gate.kind == "induction" and first.retrieval.kinds == ["induction"]
    assert first.retrieval.copy_segment_len == 8
    later = load_config(compose_config("preset=cpu_demo", "stage=cpu/pretrain"))
    assert later.gate.kind == "passkey" and later.retrieval.copy_segment_len == 48
    cli = load_config(compose_config("preset=cpu_demo", "stage=cpu/induction", "gate.kind=copy"))
    assert cli.gate.kind == "copy"


def test_world_size_must_match_dp_times_cp(compose_config):
    cfg = load_config(compose_config("stage=pretrain", "parallel.dp=2", "parallel.cp=2"))
    check_config(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"^parallel: .*world size 2"):
        check_config(cfg, world_size=2)


def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_in_process("model.n_heads=6", f"run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["config error: model.n_heads: 6 is not divisible by model.n_kv_heads=4; "
                     "n_heads must be a multiple of n_kv_heads"]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no run dir, no Hydra outputs


def test_cli_prints_resolved_config():
    proc = train_in_process("--cfg", "job", "preset=cpu_demo", "stage=cpu/pretrain", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "name: tiny" in proc.stdout and "seq_len: 512" in proc.stdout
