"""Prompt embeddings kept on disk (engine/prompt_cache.py): a re-run with the same prompt gives the same frames
without running the text encoder; anything the embedding depends on changes the key; a broken or unwritable
cache costs only an encoder run."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import PIL.Image
import pytest
import torch

from lowvram_studio.engine.config import EngineConfig
from lowvram_studio.engine.options import DeviceChoice, OffloadMode
from lowvram_studio.engine.precision import PrecisionRequest
from lowvram_studio.engine.prompt_cache import EncoderIdentity, PromptCache
from lowvram_studio.engine.sampler import sample
from lowvram_studio.engine.wan import WanFamily, WanRequest
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline, toy_tokenizer

SIZE, FRAMES, STEPS = 32, 5, 2
PLAIN = EngineConfig(device=DeviceChoice.CPU, precision=PrecisionRequest(denoiser="fp32"), preview_every=0)
CPU = torch.device("cpu")


@pytest.fixture
def pipeline():
    return build_toy_wan_pipeline()


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


class EncoderCalls:
    """Counts the text encoder's forward calls (a plain torch hook on the diffusers module)."""

    def __init__(self, encoder: torch.nn.Module):
        self.count = 0
        encoder.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))


def run(pipeline, image, cache: PromptCache | None, config: EngineConfig = PLAIN, **changes):
    texts = {"prompt": "a red ball moves left", "negative_prompt": "still scene", "guidance_scale": 5.0, **changes}
    request = WanRequest(width=SIZE, height=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, image=image,
                         max_sequence_length=16, **texts)
    return sample(WanFamily(pipeline, prompt_cache=cache), request, config)


def identity(pipeline, max_sequence_length: int = 16) -> EncoderIdentity:
    return EncoderIdentity.of_module(pipeline.text_encoder, pipeline.tokenizer, CPU, max_sequence_length)


def test_a_rerun_with_the_same_prompts_gives_the_same_frames_without_the_text_encoder(pipeline, image, tmp_path):
    calls = EncoderCalls(pipeline.text_encoder)
    uncached = run(pipeline, image, None)
    first = run(pipeline, image, PromptCache(tmp_path))
    assert calls.count == 4  # prompt and negative prompt, twice
    assert first.info["prompt_embeddings"] == {"prompt": "encoder", "negative_prompt": "encoder"}
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    again = run(pipeline, image, PromptCache(tmp_path), PLAIN.replace(offload=OffloadMode.MODEL))
    assert calls.count == 4  # not one more call
    assert again.info["prompt_embeddings"] == {"prompt": "cache", "negative_prompt": "cache"}
    assert np.array_equal(again.frames, first.frames) and np.array_equal(first.frames, uncached.frames)


def test_each_text_is_cached_on_its_own_so_a_new_prompt_reuses_the_negative(pipeline, image, tmp_path):
    cache = PromptCache(tmp_path)
    run(pipeline, image, cache)
    calls = EncoderCalls(pipeline.text_encoder)
    changed = run(pipeline, image, cache, prompt="a blue disc spins")
    assert calls.count == 1
    assert changed.info["prompt_embeddings"] == {"prompt": "encoder", "negative_prompt": "cache"}
    fresh = run(pipeline, image, None, prompt="a blue disc spins")
    assert np.array_equal(changed.frames, fresh.frames)
    unguided = run(pipeline, image, cache, guidance_scale=1.0)
    assert unguided.info["prompt_embeddings"] == {"prompt": "cache"}  # no negative branch without guidance


def test_the_key_follows_the_weights_tokenizer_precision_and_length(pipeline, tmp_path):
    text = "a red ball moves left"
    base = identity(pipeline).key(text)
    assert identity(pipeline).key(text) == base and identity(pipeline).key(text + " ") != base
    assert identity(pipeline, max_sequence_length=32).key(text) != base
    assert EncoderIdentity.of_module(pipeline.text_encoder, pipeline.tokenizer, torch.device("cuda"), 16).key(text) != base

    retrained = build_toy_wan_pipeline(seed=1)
    assert identity(retrained).key(text) != base
    with torch.no_grad():
        pipeline.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(1.01)  # fine-tuned in place
    tuned = identity(pipeline).key(text)
    assert tuned != base

    other_tokenizer = toy_tokenizer()
    other_tokenizer.backend_tokenizer.post_processor = None  # no end-of-text token: other ids for the same text
    assert EncoderIdentity.of_module(pipeline.text_encoder, other_tokenizer, CPU, 16).key(text) != tuned
    pipeline.text_encoder.to(torch.bfloat16)
    assert identity(pipeline).key(text) != tuned


def test_a_damaged_entry_is_encoded_again_and_replaced(pipeline, image, tmp_path, caplog):
    cache = PromptCache(tmp_path)
    first = run(pipeline, image, cache)
    for entry in tmp_path.glob("*.safetensors"):
        entry.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="lowvram_studio.engine.prompt_cache"):
        again = run(pipeline, image, cache)
    assert "cannot be read" in caplog.text and "encoding the prompt again" in caplog.text
    assert again.info["prompt_embeddings"] == {"prompt": "encoder", "negative_prompt": "encoder"}
    assert np.array_equal(again.frames, first.frames)
    assert cache.load(identity(pipeline), "still scene") is not None  # rewritten whole


def test_an_entry_of_the_wrong_shape_is_not_used(pipeline, tmp_path):
    cache = PromptCache(tmp_path)
    short = identity(pipeline, max_sequence_length=8)
    cache.save(short, "still scene", torch.zeros(1, 8, 32))
    cache.path(short, "still scene").rename(cache.path(identity(pipeline), "still scene"))
    assert cache.load(identity(pipeline), "still scene") is None
    assert not cache.path(identity(pipeline), "still scene").exists()


def test_a_cache_that_cannot_be_written_costs_only_the_encoder_run(pipeline, image, tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="lowvram_studio.engine.prompt_cache"):
        result = run(pipeline, image, PromptCache(blocked))
    assert result.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert "cannot store the prompt embedding" in caplog.text and "encodes it again" in caplog.text


def test_the_folder_stays_under_its_cap_least_recently_used_first_out(pipeline, tmp_path):
    one = identity(pipeline)
    embedding = torch.randn(1, 16, 32)
    cache = PromptCache(tmp_path)
    cache.save(one, "first", embedding)
    entry_bytes = cache.path(one, "first").stat().st_size
    cache.max_bytes = 2 * entry_bytes
    cache.save(one, "second", embedding)
    assert cache.load(one, "first") is not None  # used again: now the most recent
    cache.save(one, "third", embedding)
    assert cache.load(one, "second") is None
    assert torch.equal(cache.load(one, "first"), embedding) and cache.load(one, "third") is not None


def test_a_write_a_killed_process_left_behind_is_cleared_later(pipeline, tmp_path):
    stale, current = tmp_path / ".abc.xyz.partial", tmp_path / ".def.uvw.partial"
    for partial in (stale, current):
        partial.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    PromptCache(tmp_path).save(identity(pipeline), "still scene", torch.zeros(1, 16, 32))
    assert not stale.exists() and current.exists()  # a write still going on in another process is left alone
