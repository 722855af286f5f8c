import pytest

from distillery.config import apply_overrides, dump_config, load_config, read_recipe, validate_config
from distillery.errors import ConfigError
from distillery.recipes import DEFAULT_RECIPE, list_recipes, resolve_recipe


def _error(overrides, source=None):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return str(info.value)


def test_default_recipe_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.name == DEFAULT_RECIPE and len(cfg.seeds) >= 5
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again == cfg
    # the baseline's train section is the run's, merged with its own changes
    assert cfg.baseline.train.steps == cfg.train.steps
    assert cfg.baseline.train.batch_size == 32 != cfg.train.batch_size


def test_unknown_key_names_it_and_lists_valid_keys():
    msg = _error(["train.epoch=3"])
    assert "unknown key 'train.epoch'" in msg
    assert "valid keys in 'train':" in msg and "epochs" in msg and "batch_size" in msg
    assert "baseline.train" not in msg  # the mirrored error is reported once
    msg = _error(["colour=red"])
    assert "unknown key 'colour'" in msg and "valid keys at the top level" in msg and "teacher" in msg
    msg = _error(["loss.kd.temperatur=2", "loss.kd.name=kd"])
    assert "unknown key 'loss.kd.temperatur'" in msg and "temperature" in msg


def test_unknown_component_name_lists_valid_names():
    msg = _error(["loss.focal.weight=1"])
    assert (
        "loss.focal: unknown loss 'focal'" in msg
        and "valid: attention_kl, attention_scores, attention_transfer, byol, ce, cka, consistency_mse, data2vec, deit, "
        "dino, dkd, features, forward_kl, hint, ibot, importance_reverse_kl, jsd, kd, koleo, nkd, pseudo_label, relation_kl, "
        "reverse_kl, "
        "rkd_angle, rkd_distance, skew_kl, skew_reverse_kl, sp, span_likelihood, tvd, uld, uskd"
        in msg
    )
    msg = _error(["student.name=resnet"])
    assert "student: unknown name 'resnet'" in msg and "mlp" in msg and "cnn" in msg


def test_wrong_type_names_path_and_expected_type():
    msg = _error(["train.steps=ten"])
    assert "train.steps: expected an integer, got 'ten'" in msg
    msg = _error(["student.hidden=[64, wide]"])
    assert "student.hidden.1: expected an integer" in msg
    msg = _error(["teacher.cache=maybe"])
    assert "teacher.cache: expected true or false" in msg
    msg = _error(["data.name=cifar"])
    assert "data.name: expected 'digits' or 'fashion_mnist', got 'cifar'" in msg


def test_impossible_combinations_name_the_conflicting_fields():
    msg = _error(["train.epochs=3"])
    assert "conflicting fields: steps and epochs are both set" in msg
    msg = _error(["teacher.checkpoint=t.safetensors"])
    assert "teacher.train" in msg and "teacher.checkpoint" in msg and "conflicting fields" in msg
    msg = _error(["teacher=null"])
    assert "loss.forward_kl needs a teacher, but `teacher` is not set" in msg
    msg = _error(["loss={ce: {}}"])
    assert "no loss term uses it" in msg
    msg = _error(["teacher.precompute=true", "train.augment.shift=1"])
    assert "teacher.precompute" in msg and "train.augment" in msg
    msg = _error(["train.batch_size=10", "train.grad_accum=4"])
    assert "batch_size=10 is not divisible by grad_accum=4" in msg


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides(
        {"a": {"b": 1}, "l": [1, 2]}, ["a.b=2.5", "a.c.d=[1, 2]", "e=null", "f=true", "l.1=7"]
    )
    assert data == {"a": {"b": 2.5, "c": {"d": [1, 2]}}, "e": None, "f": True, "l": [1, 7]}
    for bad, text in [
        ("novalue", "not of the form key=value"),
        ("=3", "not of the form"),
        ("a.b.c=1", "is a value"),
        ("l.5=1", "not an index"),
    ]:
        with pytest.raises(ConfigError, match=text):
            apply_overrides({"a": {"b": 1}, "l": [1, 2]}, [bad])
    cfg = load_config(None, ["seeds=[3, 4]", "loss.forward_kl.temperature=6"])
    assert cfg.seeds == [3, 4] and cfg.loss["forward_kl"].temperature == 6.0


def test_labelled_loss_terms_and_names():
    cfg = load_config(
        None, ["loss={ce: {weight: 0.2}, soft: {name: forward_kl, temperature: 8}, hard: {name: forward_kl}}"]
    )
    assert set(cfg.loss) == {"ce", "soft", "hard"}
    assert cfg.loss["soft"].temperature == 8.0 and cfg.loss["hard"].temperature == 1.0


def test_missing_or_bad_files(tmp_path):
    assert "does not exist" in _error([], source=str(tmp_path / "nope.yaml"))
    assert "no recipe or config file named 'nope'" in _error([], source="nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "not valid YAML" in _error([], source=str(bad))
    bad.write_text("- a\n- b\n")
    assert "must hold a mapping" in _error([], source=str(bad))


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML" in _error([], source=str(evil))


def test_every_shipped_recipe_validates():
    recipes = list_recipes()
    assert {r.name for r in recipes} >= {"digits-kd", "fashion-mnist-kd"}
    for r in recipes:
        assert r.description and r.duration, f"{r.path} must open with two comment lines"
        assert "TIME" not in r.duration, f"{r.path}: its header needs the measured time"
        cfg = validate_config(read_recipe(r.path), source=str(r.path))
        assert cfg.name == r.name, f"{r.path}: name must match the file name"
        assert resolve_recipe(r.name) == r.path


def test_a_directory_named_like_a_recipe_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "digits-kd").mkdir()  # e.g. a run folder left in the working directory
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("digits-kd") == next(r.path for r in list_recipes() if r.name == "digits-kd")
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_recipe("./digits-kd")


def test_logit_family_recipes_exist_for_both_datasets():
    names = {r.name for r in list_recipes()}
    for dataset in ("digits", "fashion-mnist"):
        for method in ("kd", "dkd", "nkd", "reverse-kl", "jsd"):
            assert f"{dataset}-{method}" in names


def test_a_recipe_inherits_from_its_base_and_replaces_the_loss(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: digits-kd\nname: child\ntrain: {steps: 7}\nloss: {ce: {}, jsd: {beta: 0.2}}\n")
    cfg = load_config(str(child), ["train.batch_size=16"])
    base = load_config("digits-kd")
    assert cfg.name == "child" and cfg.train.steps == 7 and cfg.train.batch_size == 16
    assert cfg.train.optimizer == base.train.optimizer  # merged key by key
    assert cfg.teacher == base.teacher and cfg.data == base.data
    assert list(cfg.loss) == ["ce", "jsd"]  # replaced, not merged: no forward_kl left over


def test_recipe_base_chain_relative_paths_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: digits-kd\nseeds: [3]\n")
    cfg = load_config(str(tmp_path / "a.yaml"))
    assert cfg.name == "a" and cfg.seeds == [3]
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "recipe bases form a cycle: a.yaml -> b.yaml -> a.yaml" in _error(
        [], source=str(tmp_path / "a.yaml")
    )
    (tmp_path / "b.yaml").write_text("base: no-such-recipe\n")
    assert "no recipe or config file named 'no-such-recipe'" in _error([], source=str(tmp_path / "a.yaml"))


def test_a_derived_recipe_with_another_teacher_source_replaces_the_teacher(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: digits-self\nteacher: {source: peers, peers: 3}\n")
    assert load_config(str(child)).teacher.peers == 3  # no ema fields carried over
    child.write_text("base: digits-self\nteacher: {momentum: 0.5}\n")
    cfg = load_config(str(child))
    assert cfg.teacher.source == "ema" and cfg.teacher.momentum == 0.5  # same source: merged


def test_overriding_the_teacher_source_starts_a_fresh_teacher_section():
    cfg = load_config("digits-self", ["teacher.source=random", "teacher.init_seed_offset=3"])
    assert cfg.teacher.source == "random" and cfg.teacher.init_seed_offset == 3
    same = load_config("digits-self", ["teacher.source=ema", "teacher.momentum=0.5"])
    assert same.teacher.momentum == 0.5


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"task: unknown task 'vision'; valid: classification, encoder, lm"):
        load_config("digits-kd", ["task=vision"])
    with pytest.raises(ConfigError, match=r"task: expected a task name, got \[1\]"):
        load_config("digits-kd", ["task=[1]"])


def test_a_key_of_another_task_names_that_task():
    with pytest.raises(ConfigError) as info:
        load_config("digits-kd", ["method.name=on_policy"])
    assert "unknown key 'method' for task: classification; `method` belongs to task: lm" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("lm-kd", ["data.labelled=5"])  # a nested key of another task's section: the valid keys
    assert "unknown key 'data.labelled'; valid keys in 'data':" in str(info.value)


def test_every_task_config_shares_the_base_fields():
    from distillery.tasks import TASKS, RunConfigBase

    for name, task in TASKS.items():
        assert issubclass(task.config, RunConfigBase)
        assert task.config.model_fields["task"].default == name
        assert {"name", "seeds", "train", "baseline", "eval", "output"} <= set(task.config.model_fields)
    cfg = load_config("digits-kd")
    assert cfg.task == "classification" and "task: classification" in dump_config(cfg)


def test_a_pretrained_lm_teacher_over_a_recipe_that_trains_one_says_to_unset_train():
    with pytest.raises(ConfigError, match=r"add teacher.train=null"):
        load_config("lm-kd", ["teacher.model.pretrained=some/dir"])
    cfg = load_config("lm-kd", ["teacher.model.pretrained=some/dir", "teacher.train=null"])
    assert cfg.teacher.train is None and cfg.teacher.model.pretrained == "some/dir"
