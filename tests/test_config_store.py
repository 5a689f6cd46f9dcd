"""Settings persistence: last settings and presets survive a restart; a damaged file is set aside."""

from __future__ import annotations

import json

import pytest

from lowvram_studio.ui.config_store import ConfigStore, PresetError
from lowvram_studio.userdirs import CONFIG_ENV, config_dir


def test_config_dir_follows_the_environment_override(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "cfg"))
    assert config_dir() == tmp_path / "cfg"
    assert ConfigStore().path == tmp_path / "cfg" / "studio.json"


def test_last_settings_and_presets_survive_a_restart(tmp_path):
    store = ConfigStore(tmp_path)
    store.load()
    store.save_last({"num_frames": 6, "model": "demo"})
    assert store.save_preset("  small card ", {"unet_dtype": "fp16"}) == "small card"

    again = ConfigStore(tmp_path).load()
    assert again.warning is None
    assert again.last == {"num_frames": 6, "model": "demo"}
    assert again.presets == {"small card": {"unet_dtype": "fp16"}}


def test_presets_can_be_deleted_and_bad_names_are_refused(tmp_path):
    store = ConfigStore(tmp_path)
    store.load()
    store.save_preset("a", {"seed": 1})
    store.delete_preset("a")
    assert store.preset_names() == []
    with pytest.raises(PresetError, match="needs a name"):
        store.save_preset("   ", {})
    with pytest.raises(PresetError, match="no preset named"):
        store.preset("missing")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"presets": {"x": 3}}), "\xff\xfe"])
def test_a_corrupt_settings_file_is_set_aside_with_a_warning(tmp_path, content):
    (tmp_path / "studio.json").write_text(content, encoding="latin-1")
    loaded = ConfigStore(tmp_path).load()
    assert loaded.last == {} and loaded.presets == {}
    assert "could not be read" in loaded.warning and "moved to" in loaded.warning
    assert not (tmp_path / "studio.json").exists()
    assert len(list(tmp_path.glob("studio.json.corrupt-*"))) == 1
