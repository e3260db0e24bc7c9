import json

import pytest

from ftprof.errors import ConfigError
from ftprof.runtime.deepspeed_config import DeepSpeedConfig, load_ds_config
from tests.conftest import ROOT

CONFIGS = {
    "zero0": (0, "none", "none"),
    "zero1": (1, "none", "none"),
    "zero2": (2, "none", "none"),
    "zero3": (3, "none", "none"),
    "zero2_offload": (2, "cpu", "none"),
    "zero3_offload": (3, "cpu", "cpu"),
}
# Keys that HF Trainer fills, so one file works with any TrainingArguments.
AUTO_KEYS = [
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16.enabled",
    "bf16.enabled",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
]
ZERO3_AUTO_KEYS = [
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs(name):
    cfg = load_ds_config(ROOT / "ds_configs" / f"{name}.json")
    assert (cfg.zero_stage, cfg.offload_optimizer, cfg.offload_param) == CONFIGS[name]
    keys = AUTO_KEYS + (ZERO3_AUTO_KEYS if cfg.zero_stage == 3 else [])
    assert {k: cfg.get(k) for k in keys} == {k: "auto" for k in keys}
    assert cfg.get("scheduler") is None  # Trainer's --lr_scheduler_type applies
    if cfg.zero_stage == 3:
        assert cfg.get("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True


def test_readme_names_every_config():
    readme = (ROOT / "ds_configs" / "README.md").read_text()
    shipped = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert shipped == sorted(f"{n}.json" for n in CONFIGS)
    assert all(f"`{name}`" in readme for name in shipped)


def test_dotted_get():
    cfg = DeepSpeedConfig({"a": {"b": {"c": 3}}})
    assert cfg.get("a.b.c") == 3
    assert cfg.get("a.x.c", "default") == "default"
    assert cfg.get("a.b.c.d") is None


def write(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    return path


def test_invalid_json_names_file_and_position(tmp_path):
    path = write(tmp_path, '{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ConfigError, match=r"ds\.json' is not valid JSON: .* at line 2, column 36"):
        load_ds_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_ds_config(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must hold a JSON object, not list"),
        ('{"zero_optimization": {"stage": 4}}', "unknown ZeRO stage 4"),
        ('{"zero_optimization": {"stage": "two"}}', "unknown ZeRO stage 'two'"),
        ('{"zero_optimization": {"stage": true}}', "unknown ZeRO stage True"),
        ('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}', "offload_param needs ZeRO stage 3"),
        ('{"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}', "offload_optimizer needs ZeRO"),
        ('{"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}', "offload_param.device is 'gpu'"),
        ('{"fp16": {"enabled": true}, "bf16": {"enabled": true}}', "both true"),
        ('{"train_micro_batch_size_per_gpu": 0}', "train_micro_batch_size_per_gpu is 0"),
        ('{"zero_optimization": 2}', "zero_optimization must be an object"),
    ],
)
def test_rejected_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_ds_config(write(tmp_path, text))


def test_precision_forced():
    assert DeepSpeedConfig({"fp16": {"enabled": "auto"}}).precision_forced() is None
    assert DeepSpeedConfig({"bf16": {"enabled": True}}).precision_forced() == "bf16"


def test_shipped_configs_are_plain_json_and_each_is_tested():
    shipped = sorted(path.stem for path in (ROOT / "ds_configs").glob("*.json"))
    assert shipped == sorted(CONFIGS)  # a new file must get its row in CONFIGS (and so its checks)
    for name in shipped:
        assert isinstance(json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()), dict)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_files_are_ds_config_for_output(name):
    from ftprof.runtime.deepspeed_config import ds_config_for

    stage, opt, param = CONFIGS[name]
    expected = ds_config_for(stage, opt == "cpu", param == "cpu")
    assert json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()) == expected


def test_a_base_configs_offload_applies_where_the_stage_allows_it():
    from ftprof.runtime.deepspeed_config import for_point
    from ftprof.sweep.plan import plan_grid

    base = load_ds_config(ROOT / "ds_configs" / "zero3_offload.json")
    points = {p.zero: p for p in plan_grid([8], [1], ["bf16"], [128], [0, 2, 3], [1], offload=base.offload)}
    assert [points[z].offload for z in (0, 2, 3)] == ["none", "optimizer", "optimizer+param"]
    zero = {z: for_point(base, points[z])["zero_optimization"] for z in (0, 2, 3)}
    assert zero[2]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero[2]
    assert "offload_optimizer" not in zero[0]
    assert zero[3]["offload_param"]["device"] == "cpu"
    assert zero[3]["stage"] == 3


def test_shipped_config_names_match_their_contents():
    from ftprof.runtime.deepspeed_config import SHIPPED_CONFIGS, ds_config_for

    for (stage, offload), name in SHIPPED_CONFIGS.items():
        shipped = json.loads((ROOT / "ds_configs" / name).read_text())
        assert shipped == ds_config_for(stage, offload != "none", offload == "optimizer+param"), name


def test_a_users_block_is_used_as_written_at_its_own_stage():
    from ftprof.point import Point
    from ftprof.runtime.deepspeed_config import DeepSpeedConfig, for_point

    base = DeepSpeedConfig({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7}})
    same = for_point(base, Point(precision="fp32", zero=2, seq_len=8, batch_size=1))["zero_optimization"]
    assert same == {"stage": 2, "reduce_bucket_size": 5e7}  # no overlap_comm or buckets slipped in
    other = for_point(base, Point(precision="fp32", zero=3, seq_len=8, batch_size=1))["zero_optimization"]
    assert other["stage"] == 3
    assert other["reduce_bucket_size"] == 5e7
    assert "stage3_prefetch_bucket_size" in other


def test_without_nvcc_deepspeed_steps_the_trainers_optimizer(monkeypatch, tmp_path):
    from ftprof.runtime import deepspeed_config as dc

    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc under it
    monkeypatch.delenv(dc.TORCH_OPTIMIZER_ENV, raising=False)
    shipped = dc.load_ds_config(ROOT / "ds_configs" / "zero2.json")
    cfg, notes = dc.for_this_machine(shipped, cuda=True)
    assert "optimizer" in shipped.config
    assert "optimizer" not in cfg.config
    assert cfg.config["zero_optimization"] == shipped.config["zero_optimization"]
    assert len(notes) == 1
    assert "no nvcc" in notes[0]
    assert "--optim" in notes[0]
    # ZeRO-Offload keeps DeepSpeedCPUAdam (built by the host compiler, not nvcc).
    offload = dc.load_ds_config(ROOT / "ds_configs" / "zero2_offload.json")
    assert dc.for_this_machine(offload, cuda=True)[0].config["optimizer"] == offload.config["optimizer"]
    # With nvcc there, FusedAdam is kept.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    assert dc.for_this_machine(shipped, cuda=True) == (shipped, [])


def test_the_torch_optimizer_can_be_asked_for(monkeypatch):
    from ftprof.runtime import deepspeed_config as dc

    shipped = dc.load_ds_config(ROOT / "ds_configs" / "zero3.json")
    monkeypatch.setenv(dc.TORCH_OPTIMIZER_ENV, "torch")
    cfg, notes = dc.for_this_machine(shipped, cuda=False)
    assert "optimizer" not in cfg.config
    assert notes[-1].startswith(f"{dc.TORCH_OPTIMIZER_ENV}=torch")
    monkeypatch.delenv(dc.TORCH_OPTIMIZER_ENV)
    assert "optimizer" in dc.for_this_machine(shipped, cuda=False)[0].config  # the CPU builds its own Adam
