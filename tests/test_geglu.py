"""GEGLU on contiguous halves (engine/geglu.py): the same output as diffusers' GEGLU, hooks come and go cleanly."""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU

from lowvram_studio.engine.geglu import apply_geglu_halves, remove_geglu_halves
from lowvram_studio.settings_adapter import prepare_pipeline
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import RunSettings


def test_halves_give_diffusers_geglu_output_on_every_layer_of_the_demo_unet():
    unet = build_demo_pipeline().unet
    layers = [m for m in unet.modules() if isinstance(m, GEGLU)]
    inputs = {id(m): torch.randn(3, 7, m.proj.in_features, generator=torch.Generator().manual_seed(i))
              for i, m in enumerate(layers)}
    with torch.no_grad():
        expected = {key: layer(inputs[id(layer)]) for key, layer in ((id(m), m) for m in layers)}
        assert apply_geglu_halves(unet) == len(layers) > 0
        for layer in layers:
            got = layer(inputs[id(layer)])
            assert got.shape == expected[id(layer)].shape
            assert torch.allclose(got, expected[id(layer)], atol=1e-5, rtol=0)
    remove_geglu_halves(unet)
    with torch.no_grad():
        for layer in layers:
            assert torch.equal(layer(inputs[id(layer)]), expected[id(layer)])


def test_halves_keep_gradients_when_training():
    layer = GEGLU(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    reference = layer(x).sum()
    (grad_reference,) = torch.autograd.grad(reference, x)
    apply_geglu_halves(layer)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.allclose(grad, grad_reference, atol=1e-6)


def test_a_layer_stored_in_another_dtype_runs_diffusers_own_path():
    layer = GEGLU(8, 16).to(torch.bfloat16)  # e.g. fp8 storage: the storage hook, not ours, casts the weight
    x = torch.randn(4, 8)
    apply_geglu_halves(layer)
    reference = torch.nn.functional.linear(x, layer.proj.weight.float(), layer.proj.bias.float())
    value, gate = reference.chunk(2, dim=-1)
    layer.proj.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16),))
    out = layer(x)
    assert torch.allclose(out.float(), value * torch.nn.functional.gelu(gate), atol=0.1)


def test_cpu_runs_leave_the_unet_without_the_hook():
    """On the CPU the engine stays bit-equal to the diffusers pipeline, so it never installs the GPU fix."""
    pipeline = build_demo_pipeline()
    apply_geglu_halves(pipeline.unet)
    prepare_pipeline(pipeline, RunSettings(height=64, width=64, device="cpu"), torch.device("cpu"))
    hooked = [m for m in pipeline.unet.modules()
              if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("lowvram_geglu_halves")]
    assert hooked == []
