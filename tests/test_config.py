"""Config schema, includes, overrides and error messages."""
from pathlib import Path

import pytest
import yaml

from mdsim.config import ConfigError, PretrainConfig, StableConfig, load_config, to_dict
from mdsim.config.docs import render

ROOT = Path(__file__).resolve().parents[1]


def write(p: Path, data) -> Path:
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_follow_the_original():
    c = load_config(StableConfig)
    assert (c.integrator, c.integrator_config.ttime, c.timestep, c.n_replicas) == ("NoseHoover", 20.0, 0.5, 128)
    assert (c.bond_dev_tol, c.max_frac_unstable_threshold, c.minibatch_size, c.lr) == (0.25, 0.75, 40, 0.001)
    p = load_config(PretrainConfig)
    assert (p.optim.factor, p.optim.patience, p.optim.min_lr) == (0.8, 5, 1e-6)


def test_includes_and_overrides(tmp_path):
    write(tmp_path / "train.yml", {"n_replicas": 8, "integrator_config": {"ttime": 10, "gamma": 0.2}})
    child = write(tmp_path / "simulate.yml", {"includes": "train.yml", "train": False,
                                              "integrator_config": {"gamma": 0.5}})
    c = load_config(StableConfig, child, ["n_replicas=3", ("lr", 0.01)])
    assert c.n_replicas == 3 and c.train is False and c.lr == 0.01
    assert c.integrator_config.ttime == 10.0 and c.integrator_config.gamma == 0.5  # deep merge
    assert to_dict(c)["integrator_config"]["gamma"] == 0.5


@pytest.mark.parametrize("override,fragment", [
    ("n_replica=4", "unknown key 'n_replica' (did you mean 'n_replicas'?)"),
    ("integrator=Verlet", "integrator: 'Verlet' is not one of"),
    ("n_replicas=four", "n_replicas: expected an integer"),
    ("n_replicas=2.5", "n_replicas: expected an integer"),
    ("train=maybe", "train: expected true or false"),
    ("bond_dev_tol=-1", "below the minimum"),
    ("max_frac_unstable_threshold=1.5", "above the maximum"),
    ("integrator_config.tttime=3", "unknown key 'integrator_config.tttime' (did you mean 'ttime'?)"),
    ("eval_model=latest", "eval_model: 'latest'"),
])
def test_bad_values_name_the_key(tmp_path, override, fragment):
    f = write(tmp_path / "c.yml", {"n_replicas": 2})
    with pytest.raises(ConfigError) as ei:
        load_config(StableConfig, f, [override])
    msg = str(ei.value)
    assert fragment in msg and str(f) in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(StableConfig, tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(StableConfig, bad)
    inc = write(tmp_path / "inc.yml", {"includes": "nowhere.yml"})
    with pytest.raises(ConfigError, match="include 'nowhere.yml' not found"):
        load_config(StableConfig, inc)
    loop = write(tmp_path / "loop.yml", {"includes": "loop.yml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(StableConfig, loop)


def test_pretrain_nested_errors(tmp_path):
    f = write(tmp_path / "p.yml", {"optim": {"max_epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.max_epoch' \(did you mean 'max_epochs'\?\)"):
        load_config(PretrainConfig, f)
    with pytest.raises(ConfigError, match="optim.loss_force"):
        load_config(PretrainConfig, None, ["optim.loss_force=huber"])


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="eq_steps"):
        load_config(StableConfig, None, ["steps=10", "eq_steps=10"])
    with pytest.raises(ConfigError, match="angle_range"):
        load_config(StableConfig, None, ["angle_range=[180, 0]"])


def test_docs_are_current():
    assert (ROOT / "docs" / "config.md").read_text() == render(), \
        "docs/config.md is stale: run python -m mdsim.config.docs > docs/config.md"


def test_every_shipped_config_validates():
    files = sorted((ROOT / "configs").rglob("*.yml"))
    stable = [f for f in files if "stable_training" in f.parts or "quickstart" in f.parts]
    pre = [f for f in files if "pretraining" in f.parts]
    for f in stable:
        load_config(StableConfig, f)
    for f in pre:
        load_config(PretrainConfig, f)


@pytest.mark.parametrize("override,fragment", [
    ("timestep=-1", "timestep: -1.0 must be greater than 0"),
    ("timestep=0", "timestep: 0.0 must be greater than 0"),
    ("temperature=0", "temperature: 0.0 must be greater than 0"),
    ("integrator_config.gamma=-0.1", "integrator_config.gamma: -0.1 is below the minimum 0"),
    ("integrator_config.ttime=0", "integrator_config.ttime: 0.0 must be greater than 0"),
    ("data_temperature=-5", "data_temperature: -5.0 must be greater than 0"),
    ("integrator_config.timestep=-1", "integrator_config.timestep (-1) disagrees with timestep (0.5)"),
    ("integrator_config.temperature=300", "integrator_config.temperature (300) disagrees with temperature (500)"),
    ("pipeline.evaluate=[pre, latest]", "pipeline.evaluate[1]: 'latest' is not one of"),
])
def test_integrator_and_range_errors_name_the_keys(tmp_path, override, fragment):
    """Every accepted key takes effect or is rejected: the integrator_config aliases of
    timestep/temperature may not silently disagree with the top-level keys."""
    f = write(tmp_path / "c.yml", {"timestep": 0.5, "temperature": 500})
    with pytest.raises(ConfigError) as ei:
        load_config(StableConfig, f, [override])
    assert fragment in str(ei.value) and str(f) in str(ei.value)


def test_integrator_config_aliases_take_effect(tmp_path):
    f = write(tmp_path / "orig.yml", {"integrator_config": {"timestep": 1.0, "temperature": 300, "ttime": 10}})
    c = load_config(StableConfig, f)
    assert (c.timestep, c.temperature, c.integrator_config.ttime) == (1.0, 300.0, 10.0)
    # both given and equal: fine; the alias alone with a bad value is rejected under its own name
    c = load_config(StableConfig, None, ["timestep=2", "integrator_config.timestep=2.0"])
    assert c.timestep == 2.0
    with pytest.raises(ConfigError, match="integrator_config.timestep: -1.0 must be greater than 0"):
        load_config(StableConfig, None, ["integrator_config.timestep=-1"])
    # the saved config (to_dict) loads again
    assert load_config(StableConfig, None, [(k, v) for k, v in to_dict(c).items()]).timestep == 2.0
