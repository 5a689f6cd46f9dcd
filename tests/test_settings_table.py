"""One table says what each setting means; the CLI, the studio, the lossy list and the speed keys follow it, and
the two settings renamed from 0.1.0 (chunk_size, decode_chunk) still read from records, forms and flags."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lowvram_studio.cli import build_parser, main
from lowvram_studio.media import read_video
from lowvram_studio.monitor.reuse import reuse_from_dict
from lowvram_studio.settings import OffloadMode, Precision, RunSettings, SettingsError
from lowvram_studio.settings_table import RENAMED, TABLE, lossy_names
from lowvram_studio.speed import speed_key as calibration_key
from lowvram_studio.ui.form import INFO, upgrade_stored_form
from lowvram_studio.ui.queue_entry import speed_key as eta_key
from lowvram_studio.ui.labels import LABELS, in_user_words

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ball_and_box.png"


def test_the_table_has_one_row_per_setting_and_every_flag_reaches_its_field():
    assert list(TABLE) and set(TABLE) == {f.name for f in dataclasses.fields(RunSettings)}
    parser = build_parser()
    for row in TABLE.values():
        if row.flag is None:
            continue
        value = {bool: None, int: "3", float: "0.5", str: "x"}.get(type(getattr(RunSettings(), row.name)), "x")
        argv = ["generate", "--image", "i.png", row.flag] + ([] if value is None else [value])
        assert getattr(parser.parse_args(argv), row.name) is not None, row.flag


def test_lossy_marks_and_the_lossy_list_come_from_one_predicate():
    lossy = RunSettings(unet_dtype=Precision.FP16, vae_dtype=Precision.FP16, decode_frames=4, vae_tile=256,
                        window_frames=8, interpolate=2, num_frames=14)
    assert lossy.lossy_settings() == lossy_names(lossy) == [
        "unet_dtype", "vae_dtype", "decode_frames", "vae_tile", "window_frames", "interpolate"]
    # a window or decode call as long as the clip cuts nothing: lossless
    assert RunSettings(unet_dtype=Precision.FP32, window_frames=14, decode_frames=14, num_frames=14,
                       offload=OffloadMode.STREAM, cfg_split=True, ff_chunk=256).lossy_settings() == []
    for name in ("vae_dtype", "decode_frames", "vae_tile", "window_frames", "prune_threshold", "interpolate"):
        assert LABELS[name].endswith("⚠ lossy") and INFO[name].startswith("LOSSY"), name
    for name in ("cfg_split", "spatial_chunk", "temporal_chunk", "ff_chunk", "offload"):
        assert "lossy" not in LABELS[name] and INFO[name].startswith("Lossless"), name
    assert "lossy" not in LABELS["overlap"] + INFO["overlap"]


def test_renamed_settings_read_from_old_records_and_forms_under_their_new_names():
    old = {"chunk_size": 8, "overlap": 2, "decode_chunk": 2, "num_frames": 14}
    settings = RunSettings.from_dict(old)
    assert (settings.window_frames, settings.decode_frames) == (8, 2)
    assert RunSettings.from_dict_lenient(old)[0] == settings
    with pytest.raises(SettingsError, match="both chunk_size and window_frames"):
        RunSettings.from_dict({"chunk_size": 8, "window_frames": 6})
    assert upgrade_stored_form({"chunk_size": 8, "decode_chunk": 4, "seed": 1}) == {
        "window_frames": 8, "decode_frames": 4, "seed": 1}
    # a form saved by both releases keeps today's value
    assert upgrade_stored_form({"chunk_size": 8, "window_frames": 6}) == {"window_frames": 6}
    record = {"settings": {**RunSettings().to_dict(), "chunk_size": 8}, "model": {"name": "demo"}}
    del record["settings"]["window_frames"]
    reused = reuse_from_dict(record, "old.json")
    assert reused.settings.window_frames == 8
    assert not any("window_frames" in note for note in reused.notes), reused.notes
    assert set(RENAMED) == {"chunk_size", "decode_chunk"}


def test_messages_name_the_renamed_settings_by_their_labels():
    problem = RunSettings(window_frames=4, overlap=4).problems()[0]
    assert in_user_words(problem).startswith("“Window overlap (frames)” must be at least 0 and smaller than "
                                             "“Frame window (frames)”")


def test_a_change_of_any_time_changing_setting_changes_the_queue_and_calibration_keys():
    base = RunSettings(guidance_scale=5.0)
    for changes in ({"guidance_scale": 1.0}, {"half_compute": "fp32"}, {"window_frames": 8}):
        changed = base.replace(**changes)
        assert eta_key("m", base, same_settings=True) != eta_key("m", changed, same_settings=True), changes
    for changes in ({"guidance_scale": 1.0}, {"window_frames": 8}):
        assert calibration_key("m", "gpu", base) != calibration_key("m", "gpu", base.replace(**changes)), changes
    assert calibration_key("m", "gpu", base) == calibration_key("m", "gpu", base.replace(seed=9, vae_tile=256))


def test_the_old_flags_still_run_and_say_their_new_names(tmp_path, capsys):
    out = tmp_path / "old.mp4"
    code = main(["generate", "--image", str(ASSET), "--out", str(out), "--frames", "4", "--height", "64",
                 "--width", "64", "--steps", "1", "--chunk-size", "2", "--overlap", "1", "--decode-chunk", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: --chunk-size is now --window-frames" in err and "note: --decode-chunk is now --decode-frames" in err
    assert read_video(out)[0].shape[0] == 4
    ran = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert (ran["window_frames"], ran["decode_frames"]) == (2, 2) and "chunk_size" not in ran


def test_generate_help_lists_each_flag_under_its_group(capsys):
    from lowvram_studio.settings_table import GROUP_TITLES

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for name, title in GROUP_TITLES.items():
        section = text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        flags = [row.flag for row in TABLE.values() if row.group == name and row.flag]
        assert flags and all(flag in section for flag in flags), (title, flags)
    assert "--chunk-size" not in text and "--decode-chunk" not in text  # old names work, unlisted
