"""Configs: the real preset equals Kyutai's and transformers' own defaults; unsupported variants fail."""
import dataclasses

import pytest

from moshi_fast.config import ConfigError, LMConfig, MimiConfig, load_checkpoint_config, moshiko, tiny


def test_moshiko_matches_kyutai_loaders():
    from moshi.models import loaders

    assert LMConfig.from_kyutai_dict(loaders._lm_kwargs) == moshiko().lm
    assert MimiConfig.from_kyutai_dict(loaders._mimi_config) == moshiko().mimi
    lm = moshiko().lm
    assert (lm.hidden, lm.depformer_hidden, lm.head_dim, lm.max_delay) == (11264, 2816, 128, 1)
    assert (moshiko().mimi.frame_size, moshiko().mimi.hop_length, moshiko().mimi.steps_per_frame) == (1920, 960, 2)


def test_moshiko_matches_transformers_defaults():
    import transformers

    assert LMConfig.from_hf_dict(transformers.MoshiConfig().to_dict()) == moshiko().lm
    assert MimiConfig.from_hf_dict(transformers.MimiConfig().to_dict()) == moshiko().mimi


@pytest.mark.parametrize("preset", [moshiko, tiny])
def test_kyutai_dicts_round_trip(preset):
    config = preset()
    assert LMConfig.from_kyutai_dict(config.lm.to_kyutai_dict()) == config.lm
    assert MimiConfig.from_kyutai_dict(config.mimi.to_kyutai_dict()) == config.mimi


def test_unsupported_variants_are_rejected():
    kwargs = moshiko().lm.to_kyutai_dict()
    with pytest.raises(ConfigError, match="depformer_pos_emb='sin'"):
        LMConfig.from_kyutai_dict({**kwargs, "depformer_pos_emb": "sin"})
    with pytest.raises(ConfigError, match="delays"):
        dataclasses.replace(moshiko().lm, delays=(0, 1))
    with pytest.raises(ConfigError, match="whole number"):
        dataclasses.replace(moshiko().mimi, frame_rate=11.0)
    with pytest.raises(ConfigError, match="cardinality"):
        moshiko().replace(lm=dataclasses.replace(moshiko().lm, card=1024))


def test_directory_without_config_is_legacy_moshiko(tmp_path):
    fmt, config, raw = load_checkpoint_config(tmp_path)
    assert fmt == "kyutai" and config == moshiko() and raw == {}
