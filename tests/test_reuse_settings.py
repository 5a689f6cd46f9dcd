"""Use these settings again: `generate --from-record` reproduces a run exactly; older records load with notes;
files that are not outputs are refused with what to drop instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lowvram_studio.cli import main
from lowvram_studio.media import read_mp4_comment, read_video, write_mp4
from lowvram_studio.monitor.reuse import ReuseError, load_reuse
from lowvram_studio.ui.form import FORM_NAMES, MODEL
from lowvram_studio.ui.reuse import restore_form

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "ball_and_box.png"
RUN = ["--frames", "2", "--height", "64", "--width", "64", "--steps", "2", "--seed", "7", "--motion-bucket", "60"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """One real CLI run on the demo model: first.mp4 + first.json."""
    out = tmp_path_factory.mktemp("first") / "first.mp4"
    assert main(["generate", "--image", str(ASSET), "--out", str(out), *RUN]) == 0
    return out


def test_from_record_reproduces_identical_frames_with_the_same_model_settings_and_seed(first_run, capsys):
    assert main(["generate", "--from-record", str(first_run.with_suffix(".json"))]) == 0
    again = first_run.with_name("first-again.mp4")  # default output: beside the record

    before, after = read_video(first_run)[0], read_video(again)[0]
    assert before.shape == (2, 64, 64, 3) and np.array_equal(before, after)
    old, new = (json.loads(p.with_suffix(".json").read_text()) for p in (first_run, again))
    assert new["settings"] == old["settings"] and new["settings"]["seed"] == 7
    assert new["model"]["source"] == old["model"]["source"] == "demo"
    assert new["input"] == old["input"] and new["input"]["image"] == str(ASSET)  # the image came from the record
    assert "Restored from first.json: model demo, seed 7, 64x64, 2 frames, 2 steps" in capsys.readouterr().err


def test_the_mp4_alone_carries_the_run_so_it_restores_the_same(first_run):
    from_video, from_record = load_reuse(first_run), load_reuse(first_run.with_suffix(".json"))
    assert from_video.origin == "first.mp4 (its embedded record)"
    assert from_video.settings == from_record.settings and from_video.model == "demo"
    assert from_video.image == ASSET and from_video.notes == [] and from_video.image_note is None


def test_flags_given_with_a_record_override_it_and_say_so(first_run, tmp_path, capsys):
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"keep me")
    code = main(["generate", "--from-record", str(first_run.with_suffix(".json")), "--steps", "3", "--seed", "7",
                 "--model", "demo", "--out", str(taken)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err  # refused before computing; the notes came first
    assert "note: flags override the record: num_inference_steps 2 -> 3" in err and "seed 7 ->" not in err
    assert main(["generate", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "error: --image is required; give it, or --from-record OUT.json" in capsys.readouterr().err


def test_an_older_record_loads_with_notes_for_unknown_and_missing_fields(first_run, tmp_path):
    record = json.loads(first_run.with_suffix(".json").read_text())
    del record["settings"]["fps"], record["settings"]["prune_mode"], record["input"]
    record["settings"]["flux_capacitor"] = 1.21
    record["gpu_mood"] = "happy"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(record))

    reused = load_reuse(old)
    assert reused.notes == [
        "ignored fields it does not know: settings.flux_capacitor, gpu_mood",
        "fields missing from the record took their defaults: fps=7, prune_mode=steps",
    ]
    assert (reused.settings.seed, reused.settings.motion_bucket_id, reused.settings.fps) == (7, 60, 7)
    assert reused.image is None and "does not name its input image" in reused.image_note

    record["version"] = 99
    old.write_text(json.dumps(record))
    assert "newer LowVRAM Studio (record version 99" in load_reuse(old).notes[0]


def test_a_bare_mp4_restores_from_the_record_beside_it(first_run, tmp_path):
    bare = write_mp4(np.zeros((2, 64, 64, 3), np.float32), tmp_path / "copy.mp4", fps=7)
    assert read_mp4_comment(bare) is None
    with pytest.raises(ReuseError, match="carries no LowVRAM Studio record and has no copy.json beside it"):
        load_reuse(bare)
    shutil.copy(first_run.with_suffix(".json"), tmp_path / "copy.json")
    assert load_reuse(bare).origin == "copy.json" and load_reuse(bare).settings.seed == 7


def test_the_studio_form_gets_the_run_model_and_seed_and_names_what_it_cannot_show(first_run, tmp_path):
    restored = restore_form(str(first_run), FORM_NAMES, served=[ASSET.parent])
    assert (restored.values["seed"], restored.values["num_frames"], restored.values[MODEL]) == (7, 2, "demo")
    assert restored.values["unet_dtype"] == "fp32" and restored.values["vram_budget"] == "Manual"
    assert restored.image is not None and restored.image.size == PIL.Image.open(ASSET).size
    assert restored.message.startswith("✔ Restored from first.mp4 (its embedded record): model demo, seed 7")
    assert "unet_dtype was auto; on this machine that is fp32, set explicitly" in restored.message  # a CLI run's auto

    record = json.loads(first_run.with_suffix(".json").read_text())
    record["settings"].update(window_blend="linear", unet_dtype="bf16", vae_dtype="bf16")
    (tmp_path / "cli.json").write_text(json.dumps(record))
    again = restore_form(str(tmp_path / "cli.json"), FORM_NAMES, served=[ASSET.parent])
    assert "no control for window_blend=linear and runs the default instead" in again.message
    assert again.values["unet_dtype"] == "bf16"  # the UNet's dropdown has every precision the engine runs
    assert "FP16 switches cannot express vae_dtype=bf16" in again.message


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("picture.png", ASSET.read_bytes(), "neither an output video .* nor a run record"),
        ("notes.txt", b"hello", "neither an output video"),
        ("compare.json", b'{"runs": []}', "not a LowVRAM Studio run record .*drop an mp4"),
        ("broken.json", b'{"settings": ', "not readable JSON"),
        ("fake.mp4", b"not a video at all", "not a video ffmpeg can read"),
        ("bad.json", b'{"settings": {"height": 100}, "results": {}}', "settings in bad.json are not valid here"),
    ],
)
def test_files_that_are_not_outputs_are_refused_with_what_to_drop(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ReuseError, match=message):
        restore_form(str(path), FORM_NAMES, served=[tmp_path])


def _record_naming(first_run: Path, folder: Path, image: str | Path) -> Path:
    """A copy of the first run's record whose input image is ``image`` (what a crafted record could name)."""
    record = json.loads(first_run.with_suffix(".json").read_text())
    record["input"] = {"image": str(image), "sha256": "0" * 64}
    path = folder / "crafted.json"
    path.write_text(json.dumps(record))
    return path


def test_the_studio_reads_back_only_images_in_its_folders_and_never_says_whether_another_path_exists(
        first_run, tmp_path):
    served, elsewhere = tmp_path / "served", tmp_path / "elsewhere"
    served.mkdir(), elsewhere.mkdir()
    shutil.copy(ASSET, served / "mine.png")
    shutil.copy(ASSET, elsewhere / "secret.png")
    (served / "link.png").symlink_to(elsewhere / "secret.png")  # a link out of a served folder is not in it

    ok = restore_form(str(_record_naming(first_run, tmp_path, served / "mine.png")), FORM_NAMES, served=[served])
    assert ok.image is not None and "changed since that run" in ok.message
    notes = {}
    for name, image in (("secret", elsewhere / "secret.png"), ("missing", elsewhere / "missing.png"),
                        ("link", served / "link.png"), ("climb", served / ".." / "elsewhere" / "secret.png")):
        restored = restore_form(str(_record_naming(first_run, tmp_path, image)), FORM_NAMES, served=[served])
        assert restored.image is None, name
        notes[name] = restored.message.replace(str(image), "IMAGE")
    assert len(set(notes.values())) == 1  # "missing" and "not allowed" read the same
    assert "not available to the studio" in notes["secret"] and "choose the image yourself" in notes["secret"]


def test_a_recorded_image_over_the_size_cap_is_not_read_in_the_studio_or_the_cli(first_run, tmp_path):
    from lowvram_studio.monitor.reuse import MAX_RECORDED_IMAGE_BYTES

    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:
        file.truncate(MAX_RECORDED_IMAGE_BYTES + 1)  # sparse: costs no disk, and reading it would cost the RAM
    record = _record_naming(first_run, tmp_path, huge)
    reused = load_reuse(record)
    assert reused.image is None and "larger than the" in reused.image_note and "choose the image yourself" in reused.image_note
    restored = restore_form(str(record), FORM_NAMES, served=[tmp_path])
    assert restored.image is None and "larger than the" in restored.message


def test_checking_a_recorded_image_hashes_it_in_chunks(first_run, tmp_path):
    import tracemalloc

    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.truncate(32 * 2**20)  # under the cap: read, hashed, found changed
    record = _record_naming(first_run, tmp_path, big)
    tracemalloc.start()
    try:
        reused = load_reuse(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reused.image == big and "changed since that run" in reused.image_note
    assert peak < 8 * 2**20  # not the whole 32 MiB file at once


def test_a_dropped_record_over_the_size_cap_is_refused_unread(tmp_path):
    from lowvram_studio.monitor.reuse import MAX_RECORD_BYTES

    huge = tmp_path / "huge.json"
    with huge.open("wb") as file:
        file.truncate(MAX_RECORD_BYTES + 1)
    with pytest.raises(ReuseError, match="huge.json is larger than"):
        restore_form(str(huge), FORM_NAMES, served=[tmp_path])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"noise_aug_strength": "abc"}, 'noise_aug_strength must be a number (float); got "abc" (str)'),
        ({"seed": True}, "seed must be a whole number (int); got true (bool)"),
        ({"extra": "hello"}, 'extra must be an object of named values (dict); got "hello" (str)'),
        ({"cfg_split": "yes"}, 'cfg_split must be true or false (bool); got "yes" (str)'),
    ],
)
def test_a_record_with_a_value_of_the_wrong_type_is_refused_naming_it(first_run, tmp_path, capsys, change, message):
    record = json.loads(first_run.with_suffix(".json").read_text())
    record["settings"].update(change)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(record))
    with pytest.raises(ReuseError, match="the settings in odd.json are not valid here") as caught:
        load_reuse(odd)
    assert message in str(caught.value)
    assert main(["generate", "--from-record", str(odd), "--out", str(tmp_path / "o.mp4")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


@pytest.mark.parametrize(
    ("image", "note"),
    [
        (["a"], 'its input image is recorded as ["a"] (list), not a file path; choose the image yourself'),
        (5, "its input image is recorded as 5 (int), not a file path; choose the image yourself"),
        ("/tmp/" + "x" * 300 + ".png", "cannot be read (File name too long); choose the image yourself"),
    ],
)
def test_a_recorded_image_that_is_no_path_is_a_note_not_a_crash(first_run, tmp_path, image, note):
    record = json.loads(first_run.with_suffix(".json").read_text())
    record["input"] = {"image": image, "sha256": "0" * 64}
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(record))
    reused = load_reuse(odd)
    assert reused.image is None and note in reused.image_note
    restored = restore_form(str(odd), FORM_NAMES, served=[tmp_path])
    assert restored.image is None and "choose the image yourself" in restored.message
