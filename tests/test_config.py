"""Config validation: files, --set overrides and mode-dependent defaults, with errors that name the field."""
import pytest

from schemas.config import ConfigError, config_from_dict, load_config


def test_example_configs_validate():
    for name in ("paa", "kd", "solad", "lad", "colad"):
        cfg = load_config(f"configs/{name}_digits.yaml")
        assert cfg.mode == name


def test_kd_and_solad_defaults_are_the_papers():
    kd = config_from_dict({"mode": "kd", "teacher": {"checkpoint": "t.pt"}})
    solad = config_from_dict({"mode": "solad", "teacher": {"checkpoint": "t.pt"}})
    assert (kd.distill.cls_weight, kd.distill.iou_weight, kd.distill.box_weight, kd.distill.min_iou) == (10, 10, 1.3, 0.1)
    assert (solad.distill.cls_weight, solad.distill.min_iou) == (2.0, 0.5)


def test_set_overrides_parse_yaml_values():
    cfg = load_config("configs/paa_digits.yaml", ["train.lr=1e-3", "model.fpn_levels=[3,4,5,6,7]", "name=x"])
    assert cfg.train.lr == 1e-3 and cfg.model.strides == [8, 16, 32, 64, 128] and cfg.name == "x"


@pytest.mark.parametrize("override,field", [
    ("train.lr=-1", "train.lr"),
    ("train.bogus=1", "train.bogus"),
    ("model.depth=19", "model.depth"),
    ("model.fpn_levels=[3,5]", "model.fpn_levels"),
    ("colearn.policy=sometimes", "colearn.policy"),
    ("train.amp_dtype=fp8", "train.amp_dtype"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("configs/paa_digits.yaml", [override])
    assert "configs/paa_digits.yaml" in str(e.value) and field in str(e.value)


def test_lad_without_teacher_is_refused():
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        config_from_dict({"mode": "lad"})


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [paa\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config("configs/paa_digits.yaml", ["train.lr"])


def test_fp16_on_a_cpu_device_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.amp_dtype"):
        load_config("configs/paa_digits.yaml", ["train.amp=true", "train.amp_dtype=fp16", "train.device=cpu"])
    assert load_config("configs/paa_digits.yaml", ["train.amp=true"]).train.amp


def test_older_soft_label_settings_still_load():
    """Configs and checkpoints written before the soft labels travelled as a picture set `pipeline.soft_label_floor`
    (schema 3) or `soft_label_tolerance` (4-5). They keep loading: 0 (every entry exact) as the lossless quality,
    anything else as the default."""
    for key in ("soft_label_floor", "soft_label_tolerance"):
        old = config_from_dict({"pipeline": {key: 0.02}}, "old.yaml")
        assert old.pipeline.soft_label_quality == 85 and key not in old.to_dict()["pipeline"]
        assert config_from_dict({"pipeline": {key: 0.0}}, "old.yaml").pipeline.soft_label_quality == 100
    with pytest.raises(ConfigError, match="soft_label_quality"):
        config_from_dict({"pipeline": {"soft_label_quality": 101}}, "new.yaml")
