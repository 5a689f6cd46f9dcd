"""The studio driven through gradio_client against the real app on the demo model (64x64, few frames, 2 steps)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from lowvram_studio.media import read_mp4_comment, read_video
from lowvram_studio.ui.serve import serve_studio, start_studio
from lowvram_studio.ui.studio import ASSETS, Studio
from lowvram_studio.ui.budget import PLANNED_FIELDS
from lowvram_studio.ui.config_store import ConfigStore
from lowvram_studio.ui.curves import LEGEND_CHARS
from lowvram_studio.ui.form import FORM_NAMES
from lowvram_studio.ui.share import ShareError

ASSET = ASSETS / "ball_and_box.png"
SMALL = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2}


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(studio: Studio, **launch):
    app, url, _ = serve_studio(studio, _port(), server_name="127.0.0.1", quiet=True, **launch)
    return app, url


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return Studio("demo", tmp_path_factory.mktemp("outputs"), ConfigStore(tmp_path_factory.mktemp("config")))


@pytest.fixture(scope="module")
def studio_url(studio):
    app, url = _serve(studio)
    yield url
    studio.worker.close()
    app.close()


def _status_lines(job) -> list[str]:
    return [output[0] for output in job.outputs()]


def test_generate_streams_progress_then_shows_video_stats_and_downloads(studio, studio_url):
    client = Client(studio_url, verbose=False)
    job = client.submit(image_path=handle_file(str(ASSET)), **SMALL, api_name="/generate")
    status, progress, curve, video, stats, downloads, *_ = job.result(timeout=120)

    lines = _status_lines(job)
    assert lines[0].startswith(("▶", "⏳"))  # live status from the moment the job is submitted
    bars = [int(re.search(r'<progress max="100" value="(\d+)"', out[1])[1]) for out in job.outputs()]
    assert bars == sorted(bars) and bars[-1] == 100  # a real bar that only moves forward, full at the end
    assert all("denoise step" in line and "/2" in line for line in lines if "denoise step" in line)
    assert status.startswith("✔ 4 frames at 64x64") and "Grey lines, phase starts" in status
    frames, _ = read_video(video["video"] if isinstance(video, dict) else video)
    assert frames.shape[0] == 4
    series = {row[2] for row in curve["value"]["data"]}
    assert any("FP32" in s for s in series) and "| denoise" in series
    row = dict(zip(stats["value"]["headers"], stats["value"]["data"][0], strict=True))
    peak = next(h for h in row if h.startswith("peak "))  # the header names what was measured
    assert peak in ("peak CPU RAM (MiB)", "peak VRAM (MiB)") and float(row[peak]) > 0
    assert sorted(Path(f).suffix for f in downloads) == [".gif", ".json", ".mp4", ".png"]
    assert studio.store.data.last["num_frames"] == 4  # remembered for the next start


def test_stop_ends_a_run_while_a_second_tab_waits_with_its_position(studio_url):
    first, second = Client(studio_url, verbose=False), Client(studio_url, verbose=False)
    long_run = first.submit(image_path=handle_file(str(ASSET)), **{**SMALL, "num_inference_steps": 60},
                            api_name="/generate")
    deadline = time.time() + 60
    while not any("denoise step" in line for line in _status_lines(long_run)) and time.time() < deadline:
        time.sleep(0.2)
    queued = second.submit(image_path=handle_file(str(ASSET)), **SMALL, api_name="/generate")
    while not any("Waiting for the GPU" in line for line in _status_lines(queued)) and time.time() < deadline:
        time.sleep(0.2)
    assert any("1 job(s) ahead" in line for line in _status_lines(queued))

    stopped_at = time.time()
    assert "Stopping" in first.predict(api_name="/stop")
    status = long_run.result(timeout=60)[0]
    assert status.startswith("⏹ Stopped (denoise step")
    assert time.time() - stopped_at < 15  # one demo step plus clean-up, not the 60 steps
    assert queued.result(timeout=120)[0].startswith("✔ 4 frames")


def test_user_errors_arrive_as_messages_with_the_fix(studio_url, tmp_path):
    client = Client(studio_url, verbose=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    with pytest.raises(AppError):  # refused by Gradio's own image preprocessing, before our handler
        client.predict(image_path=handle_file(str(broken)), **SMALL, api_name="/generate")
    with pytest.raises(AppError, match="No input image"):
        client.predict(image_path=None, **SMALL, api_name="/generate")
    with pytest.raises(AppError, match="“Window overlap \\(frames\\)” must be at least 0 and smaller than "
                                       "“Frame window \\(frames\\)”"):  # the page's labels, not field names
        client.predict(image_path=handle_file(str(ASSET)), **SMALL, window_frames=4, overlap=6, api_name="/generate")
    with pytest.raises(AppError, match="“Temporal-layer chunk \\(positions\\)” moves in steps of 256 from 0; "
                                       "127 is not one of them: use 0"):  # a typed value between steps never runs
        client.predict(image_path=handle_file(str(ASSET)), **SMALL, temporal_chunk=127, api_name="/generate")
    with pytest.raises(AppError, match="was not found.*model_index.json"):
        client.predict(image_path=handle_file(str(ASSET)), **SMALL, model="/no/such/model", api_name="/generate")


def test_named_presets_save_load_and_reset(studio_url, studio):
    client = Client(studio_url, verbose=False)
    client.predict(name="tiny card", **SMALL, unet_dtype="fp8", api_name="/save_preset")
    assert "tiny card" in studio.store.preset_names()
    loaded = dict(zip(FORM_NAMES, client.predict(name="tiny card", api_name="/load_preset")))
    assert (loaded["num_frames"], loaded["unet_dtype"], loaded["width"]) == (4, "fp8", 64)
    defaults = dict(zip(FORM_NAMES, client.predict(api_name="/reset")))
    assert (defaults["num_frames"], defaults["unet_dtype"]) == (14, "fp32")  # the engine's pick on the CPU
    client.predict(name="tiny card", api_name="/delete_preset")
    assert "tiny card" not in studio.store.preset_names()


def test_compare_runs_fp32_fp16_and_optimized_with_fidelity(studio_url):
    client = Client(studio_url, verbose=False)
    status, _, curve, _, stats, downloads, _, _, side_by_side = client.predict(
        image_path=handle_file(str(ASSET)), **{**SMALL, "num_frames": 2, "num_inference_steps": 1}, api_name="/compare")
    headers, rows = stats["value"]["headers"], stats["value"]["data"][-3:]
    assert [r[0].split()[0] for r in rows] == ["FP32", "FP16", "FP16"]
    # Fidelity right after the run's name (in view on a laptop), throughput not called an FPS
    assert headers[:3] == ["run", "PSNR (dB)", "SSIM"] and "frames generated per s" in headers
    assert not any("FPS" in h for h in headers)
    assert rows[1][1] != "n/a" and rows[1][2] != "n/a"  # PSNR / SSIM against the FP32 reference
    assert {Path(f).name for f in downloads} >= {"compare.json", "curves.png", "table.md", "side_by_side.mp4"}
    frames, _ = read_video(side_by_side["video"] if isinstance(side_by_side, dict) else side_by_side)
    assert frames.shape[2] == 3 * 64 + 2 * 8  # the three runs next to each other
    colors = curve["color_map"]
    runs = [name for name in colors if name.startswith("#")]
    assert len(runs) >= 3 and len({colors[name] for name in runs}) == len(runs)  # each run its own colour
    assert all(len(name) <= len("#10 ") + LEGEND_CHARS for name in runs)  # the legend shows them whole


def test_only_output_and_asset_folders_are_served(studio_url, studio):
    project_file = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert httpx.get(f"{studio_url}gradio_api/file={project_file}", timeout=10).status_code == 403
    assert httpx.get(f"{studio_url}gradio_api/file=/etc/hostname", timeout=10).status_code == 403
    assert httpx.get(f"{studio_url}gradio_api/file={ASSET}", timeout=10).status_code == 200


def test_wrong_password_is_rejected_and_problems_show_on_the_page(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "studio.json").write_text("{ this is not json", encoding="utf-8")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    studio = Studio("demo", blocker / "outputs", ConfigStore(tmp_path / "config"))
    app, url = _serve(studio, auth=("me", "long-secret"))
    try:
        assert httpx.post(f"{url}login", data={"username": "me", "password": "wrong"}, timeout=10).status_code == 400
        with pytest.raises(Exception):
            Client(url, auth=("me", "wrong"), verbose=False)
        client = Client(url, auth=("me", "long-secret"), verbose=False)
        banner = client.predict(api_name="/restore")[-2]
        assert "saved settings could not be read" in banner and "moved to" in banner
        assert "cannot create the output folder" in banner
        with pytest.raises(AppError, match="cannot create the output folder .*--outputs DIR"):
            client.predict(image_path=handle_file(str(ASSET)), **SMALL, api_name="/generate")
    finally:
        studio.worker.close()
        app.close()


def _ui_args(**overrides) -> argparse.Namespace:
    values = {"port": _port(), "listen": False, "share": False, "auth": None, "insecure_share": False,
              "no_browser": True, "model": "demo", "outputs": None}
    return argparse.Namespace(**{**values, **overrides})


def test_share_without_a_password_is_refused(tmp_path):
    with pytest.raises(ShareError, match="--auth USER:PASS"):
        start_studio(_ui_args(share=True, outputs=tmp_path))


def test_offline_share_is_reported_plainly_and_the_local_address_keeps_working(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STUDIO_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LOWVRAM_STUDIO_AUTH", "me:long-secret")
    running = start_studio(_ui_args(share=True, outputs=tmp_path / "out"))
    try:
        assert running.local_url.startswith("http://127.0.0.1:")
        if running.share_url is None:  # this machine is offline (CI): say so and keep serving locally
            assert "Could not create a public share link" in running.share_report
            assert running.local_url in running.share_report
        assert httpx.get(running.local_url, timeout=10).status_code == 200
    finally:
        running.close()


def test_repeated_wrong_passwords_lock_the_studio_login(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_STUDIO_CONFIG_DIR", str(tmp_path / "config"))
    running = start_studio(_ui_args(auth="me:long-secret", outputs=tmp_path / "out"))
    try:
        login = f"{running.local_url}login"
        started = time.perf_counter()
        wrong = [httpx.post(login, data={"username": "me", "password": f"guess{i}"}, timeout=10).status_code
                 for i in range(10)]
        right = httpx.post(login, data={"username": "me", "password": "long-secret"}, timeout=10).status_code
        assert wrong == [400] * 10 and right == 400  # locked after three: the other guesses were not even checked
        assert time.perf_counter() - started < 5.0  # refused at once, not slept through (that would be 7 s+)
    finally:
        running.close()


def test_custom_budget_and_form_values_round_trip_through_settings():
    from lowvram_studio.ui.form import form_to_settings, settings_to_form

    form = {"vram_budget": "Custom", "budget_gib": 5.5, "unet_dtype": True, "num_frames": 6.0, "interpolate": "2"}
    settings = form_to_settings(form)
    assert (settings.vram_budget, settings.unet_dtype.value, settings.num_frames, settings.interpolate) == (
        "5.5GB", "fp16", 6, 2)
    assert settings_to_form(settings, list(form)) == {**form, "num_frames": 6, "unet_dtype": "fp16"}


def test_a_form_saved_when_the_unet_precision_was_a_checkbox_loads_into_the_dropdown(studio):
    from lowvram_studio.ui.form import UNET_PRECISION_CHOICES, upgrade_stored_form

    values = [value for _, value in UNET_PRECISION_CHOICES]
    assert values == ["fp32", "fp16", "bf16", "fp8"]
    assert upgrade_stored_form({"unet_dtype": True, "seed": 3}) == {"unet_dtype": "fp16", "seed": 3}
    assert upgrade_stored_form({"unet_dtype": False})["unet_dtype"] == "fp32"
    assert upgrade_stored_form({"unet_dtype": "bf16"})["unet_dtype"] == "bf16"
    studio.store.save_last({**studio.default_form(FORM_NAMES), "unet_dtype": True, "num_frames": 6})
    restored, note = studio.restored_form(FORM_NAMES)
    assert (restored["unet_dtype"], restored["num_frames"], note) == ("fp16", 6, "")


SVD_SIZE = {"width": 1024, "height": 576, "num_frames": 25}  # SVD-XT's native request (DESIGN case B)


def _budget(client: Client, **form) -> tuple[dict, str]:
    """Pick a budget through the page's API: (controls the plan changed, the note beside the panel)."""
    *values, note, _chart = client.predict(**form, api_name="/plan_budget")
    return {name: v for name, v in zip(PLANNED_FIELDS, values, strict=True) if v != {"__type__": "update"}}, note


def _bars(chart: str) -> dict[str, tuple[int, bool]]:
    """The budget chart's bars: phase -> (predicted MiB, over the usable memory)."""
    return {phase: (int(mib), over == "true")
            for phase, mib, over in re.findall(r'data-phase="([^"]+)" data-mib="(\d+)" data-over="(\w+)"', chart)}


def test_the_budget_plan_is_drawn_as_one_bar_per_phase_against_the_budget(studio_url):
    client = Client(studio_url, verbose=False)
    *_, fits = client.predict(**SVD_SIZE, vram_budget="4 GB", api_name="/plan_budget")
    bars = _bars(fits)
    assert {"encode image", "denoise", "decode"} <= set(bars) and not any(over for _, over in bars.values())
    assert "usable 3.75 GiB" in fits and "budget 4.00 GiB" in fits  # the lines the bars are measured against
    *_, too_small = client.predict(**SVD_SIZE, vram_budget="Custom", budget_gib=0.5, api_name="/plan_budget")
    assert any(over for _, over in _bars(too_small).values())  # the phase that breaks the budget shows red


def test_picking_4gb_fills_the_controls_with_the_plan_generate_applies(studio_url, studio, demo_pipeline):
    from lowvram_studio.engine.dims import ModelDims
    from lowvram_studio.plan.planner import Planner, plan_for_settings
    from lowvram_studio.engine.sampler import resolve_device
    from lowvram_studio.ui.form import form_to_settings

    client = Client(studio_url, verbose=False)
    request = {**studio.default_form(FORM_NAMES), **SVD_SIZE, "vram_budget": "4 GB"}
    changes, note = _budget(client, **SVD_SIZE, vram_budget="4 GB")

    planner = Planner(ModelDims.from_pipeline(demo_pipeline, "demo"), device_type=resolve_device("auto").type)
    plan = plan_for_settings(planner, form_to_settings(request))  # what jobs.run_job would apply to the request
    shown = form_to_settings({**request, **changes})
    assert plan.fits and plan.reasons and changes
    assert shown.to_dict() == plan.settings.to_dict()
    assert plan_for_settings(planner, shown).settings.to_dict() == shown.to_dict()  # Generate changes nothing more
    assert note.count("\n1. ") == 1 and "✔ Fits" in note and "VRAM budget 4GB" in note
    assert all(reason.split(";")[0] in note for reason in plan.reasons)
    assert "encode image" in note and "denoise" in note and "decode" in note  # predicted peak per phase


def test_a_budget_too_small_for_anything_says_so_and_changes_nothing(studio_url):
    changes, note = _budget(Client(studio_url, verbose=False), **SVD_SIZE, vram_budget="Custom", budget_gib=0.5)
    assert changes == {}
    assert "✖ Does not fit" in note and "lower the size or frame count" in note and "left as they are" in note


def test_manual_changes_nothing(studio_url):
    changes, note = _budget(Client(studio_url, verbose=False), **SVD_SIZE, vram_budget="Manual", cfg_split=True)
    assert changes == {} and note.startswith("Manual")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Auto plans for the real GPU's free memory there")
def test_auto_without_a_gpu_says_there_is_nothing_to_plan_for_and_changes_nothing(studio_url):
    changes, note = _budget(Client(studio_url, verbose=False), **SVD_SIZE, vram_budget="Auto")
    assert changes == {} and "no GPU memory to plan for" in note


def test_lossy_and_ghosting_warnings_name_the_setting():
    from lowvram_studio.settings import RunSettings
    from lowvram_studio.ui.form import lossy_summary, prune_warning

    assert lossy_summary(RunSettings(unet_dtype="fp32")).startswith("Lossless")
    assert "prune_threshold" in lossy_summary(RunSettings(unet_dtype="fp32", prune_threshold=0.01))
    assert "ghosting" in prune_warning(0.005) and prune_warning(0.0) == "" and prune_warning(0.012) == ""


def test_out_of_memory_becomes_a_message_with_the_fix():
    from lowvram_studio.ui.studio import user_message

    message = user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "ran out of memory" in message and "smaller VRAM budget" in message
    ram = user_message(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert "ran out of RAM" in ram and "GPU" not in ram and "previous results are kept" in ram


def test_serving_binds_locally_unless_told_and_parses_auth():
    from lowvram_studio.ui.share import serve_options

    assert serve_options(False, False, None, False, environ={}).server_name == "127.0.0.1"
    assert serve_options(True, False, None, False, environ={}).server_name == "0.0.0.0"
    assert serve_options(False, True, None, False, environ={"LOWVRAM_STUDIO_AUTH": "me:a:b"}).auth == ("me", "a:b")
    assert serve_options(False, True, None, True, environ={}).auth is None  # explicitly insecure
    with pytest.raises(ShareError, match="USER:PASS"):
        serve_options(False, False, "no-colon", False, environ={})


def test_dropping_an_output_fills_form_model_seed_and_image_and_a_bad_drop_changes_nothing(studio_url, tmp_path):
    client = Client(studio_url, verbose=False)
    video = client.predict(image_path=handle_file(str(ASSET)), **SMALL, seed=5, motion_bucket_id=40,
                           api_name="/generate")[3]
    video = video["video"] if isinstance(video, dict) else video
    *values, image, note = client.predict(handle_file(video), api_name="/reuse")
    form = dict(zip(FORM_NAMES, values))
    assert (form["seed"], form["motion_bucket_id"], form["num_frames"], form["model"]) == (5, 40, 4, "demo")
    assert image and note.startswith("✔ Restored from") and "model demo, seed 5" in note
    crafted = tmp_path / "crafted.json"  # a record naming a file of this machine the studio does not serve
    record = json.loads(read_mp4_comment(video))
    record["input"] = {"image": str(tmp_path / "secret.png")}
    shutil.copy(ASSET, tmp_path / "secret.png")
    crafted.write_text(json.dumps(record))
    *_, image, note = client.predict(handle_file(str(crafted)), api_name="/reuse")
    assert image == {"__type__": "update"} and "is not available to the studio" in note  # image left as it was
    with pytest.raises(AppError, match="neither an output video .* nor a run record"):
        client.predict(handle_file(str(ASSET)), api_name="/reuse")


def test_a_queued_seed_sweep_runs_in_order_and_a_waiting_job_can_be_removed(studio_url):
    client = Client(studio_url, verbose=False)
    table, message = client.predict(image_path=handle_file(str(ASSET)), seed_list="11..13",
                                    **{**SMALL, "num_frames": 2, "num_inference_steps": 1}, api_name="/queue_add")
    assert message.startswith("Queued 3 job(s)")
    rows = table["value"]["data"][-3:]
    assert [row[2].split(" · ")[0] for row in rows] == ["seed 11", "seed 12", "seed 13"]
    client.predict(rows[2][1], api_name="/queue_remove")  # seed 13 waits behind two jobs: it never runs
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = client.predict(api_name="/queue_view")["value"]["data"]
        if [row[3] for row in rows[-2:]] == ["done", "done"]:
            break
        time.sleep(0.5)
    assert [row[2].split(" · ")[0] for row in rows[-2:]] == ["seed 11", "seed 12"]
    assert [row[3] for row in rows[-2:]] == ["done", "done"] and rows[-1][5].startswith("queue-")
    with pytest.raises(AppError, match="no queued job 'nope'"):
        client.predict("nope", api_name="/queue_remove")
