"""A Wan folder's text encoder stays on disk until a prompt needs it (models/deferred.py): identified by its
files without reading them whole, counted from its headers, read whole only on demand."""

from __future__ import annotations

import shutil

import pytest
import torch

from lowvram_studio.models.deferred import DeferredTextEncoder
from lowvram_studio.models.load import load_model
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "toy-wan"
    build_toy_wan_pipeline().save_pretrained(folder)
    return folder


def test_loading_a_wan_folder_leaves_its_text_encoder_on_disk(wan_folder):
    model = load_model(wan_folder)
    assert model.pipeline.text_encoder is None
    source = model.text_encoder_source
    assert isinstance(source, DeferredTextEncoder) and source.class_name == "UMT5EncoderModel"
    encoder = source.load(torch.float32)
    expected = build_toy_wan_pipeline().text_encoder
    assert source.parameters() == sum(p.numel() for p in encoder.parameters()) == sum(
        p.numel() for p in expected.parameters())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


def test_the_files_fingerprint_is_stable_and_follows_every_change(wan_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(wan_folder, copy)
    fingerprint = DeferredTextEncoder(wan_folder / "text_encoder", "UMT5EncoderModel").fingerprint()
    same = DeferredTextEncoder(copy / "text_encoder", "UMT5EncoderModel")
    assert same.fingerprint() == fingerprint and fingerprint.startswith("UMT5EncoderModel:files-sha256:")
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size and header; the toy file is within the sampled blocks (a 11 GB one: 1 MiB of it)
    weights.write_bytes(bytes(data))
    assert DeferredTextEncoder(copy / "text_encoder", "UMT5EncoderModel").fingerprint() != fingerprint
