"""One source for each default: `Config` is the truth; `Trainer`'s keyword defaults and `configs/default.yaml` agree.

`hjepa.recipe.TRAINER_ARGS` is the one table from config keys to `Trainer` keywords. For every entry the config's
default must equal the keyword's default in `Trainer.__init__`'s signature, except the entries in `BY_DESIGN`, where the
library default differs on purpose (each with its reason; the test also fails if such a pair stops differing, so the
list cannot go stale).
"""
import dataclasses, inspect, re
from pathlib import Path

import pytest
import yaml

from hjepa.config import DATASET_NAMES, PRESET_NAMES, Config, ModelConfig, load_config, to_dict
from hjepa.recipe import TRAINER_ARGS, config_value
from hjepa.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

BY_DESIGN = {
    'train.epochs': "Trainer has no length of its own (pass max_steps= or epochs=); the bundled recipe trains 5 epochs",
    'train.ckpt_every': "the library writes periodic checkpoints only when asked (None: at the end); "
                        "hjepa train keeps one every 200 steps so that a long run can resume",
}

# Trainer keywords with a default that are not config keys: objects or values the recipe computes or passes itself.
NOT_CONFIG = {
    'loss_fn': 'built from loss.* by build_loss', 'val_loader': 'built from the test split',
    'total_steps': 'computed by hjepa.trainer.total_steps', 'level_weights': 'a LevelWeightSchedule from model.*',
    'optimizer': 'Trainer builds AdamW from optim.*', 'forward_fn': 'code, not configuration',
    'callbacks': 'code, not configuration', 'out_dir': 'the --out folder', 'logger': 'built from log.*',
    'val_batches': 'the whole test split', 'config': 'the config itself', 'device': 'train.device via resolve_device',
    'good_every': 'a safety net (the last good state), not a recipe choice',
}


def trainer_defaults() -> dict:
    return {n: p.default for n, p in inspect.signature(Trainer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_bundled_yaml_is_exactly_the_config_default():
    raw = yaml.safe_load((ROOT / 'configs' / 'default.yaml').read_text())
    assert raw == to_dict(Config()), "configs/default.yaml differs from to_dict(Config()): regenerate it from Config"
    assert load_config(ROOT / 'configs' / 'default.yaml') == Config()


def test_every_table_entry_is_a_config_key_and_a_trainer_keyword():
    params = inspect.signature(Trainer.__init__).parameters
    for key, arg in TRAINER_ARGS.items():
        config_value(Config(), key)                       # AttributeError: the config has no such key
        assert arg in params, f"TRAINER_ARGS maps {key} to {arg}, which Trainer does not take"
    assert len(set(TRAINER_ARGS.values())) == len(TRAINER_ARGS), "a Trainer keyword is fed by two config keys"
    assert set(BY_DESIGN) <= set(TRAINER_ARGS)


def test_config_defaults_are_trainer_defaults():
    tdef, cfg = trainer_defaults(), Config()
    wrong = {}
    for key, arg in TRAINER_ARGS.items():
        if key in BY_DESIGN: continue
        if arg not in tdef: wrong[key] = f"Trainer's {arg} has no default (the config says {config_value(cfg, key)!r})"
        elif config_value(cfg, key) != tdef[arg]:
            wrong[key] = f"Config {config_value(cfg, key)!r} != Trainer {arg}={tdef[arg]!r}"
    assert not wrong, "defaults disagree (Config is the truth: change Trainer, or list the key in BY_DESIGN " \
                      "with a reason):\n" + '\n'.join(f"  {k}: {v}" for k, v in wrong.items())


def test_by_design_differences_still_differ():
    tdef, cfg = trainer_defaults(), Config()
    for key, why in BY_DESIGN.items():
        arg = TRAINER_ARGS[key]
        assert config_value(cfg, key) != tdef.get(arg, inspect.Parameter.empty), \
            f"{key} now equals Trainer's default: drop it from BY_DESIGN ({why})"


def test_every_trainer_default_is_covered():
    "A new Trainer keyword with a default is either fed from the config (TRAINER_ARGS) or listed in NOT_CONFIG."
    left = set(trainer_defaults()) - set(TRAINER_ARGS.values()) - set(NOT_CONFIG)
    assert not left, f"Trainer keywords with defaults that no config key feeds: {sorted(left)}: add them to " \
                     f"TRAINER_ARGS (and Config), or to NOT_CONFIG with a reason"


def test_name_tuples_match_their_modules():
    from hjepa.data import DATASETS
    from hjepa.encoders import PRESETS
    assert DATASET_NAMES == DATASETS, "hjepa.config.DATASET_NAMES must list hjepa.data.DATASETS"
    assert PRESET_NAMES == tuple(PRESETS), "hjepa.config.PRESET_NAMES must list hjepa.encoders.PRESETS"


def test_level_weights_help_names_the_one_source():
    from hjepa.model import default_level_weights
    f = {f.name: f for f in dataclasses.fields(ModelConfig)}['level_weights']
    assert f.default is None, "model.level_weights defaults to null: the model's default_level_weights decides"
    text = f.metadata['help']
    assert 'default_level_weights' in text and not re.search(r'\d\.\d', text), \
        f"the help restates numbers that can drift from hjepa.model.default_level_weights: {text!r}"
    assert len(default_level_weights(3)) == 3


def test_the_bundled_job_is_hjepa_with_at_least_two_levels():
    from hjepa.config import method_name
    cfg = load_config()
    assert cfg.model.num_levels >= 2 and method_name(cfg) == 'hjepa'
    assert cfg.eval.knn_every, "the bundled job shows its k-NN probe curve"


@pytest.mark.parametrize('levels', [1, 2, 3])
def test_mask_defaults_follow_the_number_of_levels(levels):
    import torch
    from hjepa.masking import default_npred
    from hjepa.recipe import build_mask_generator
    cfg = load_config(overrides=[f'model.num_levels={levels}'])          # nothing else touched
    mg = build_mask_generator(cfg)
    assert mg.num_levels == levels and mg.npred == default_npred(levels)
    ctx, tgts = mg(64, torch.Generator().manual_seed(0))
    assert len(tgts) == levels and ctx.shape[1] >= cfg.mask.min_keep
    assert mg.last_stats['relaxed'] == 0                                    # no sample had to give up min_keep
    # the old rule (the same npred at every level) is what failed at three levels
    with pytest.raises(Exception, match='min_keep'):
        build_mask_generator(load_config(overrides=['model.num_levels=3', 'mask.npred=[3]']))
