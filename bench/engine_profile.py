"""Where the lossless engine's time and memory go (issue 4: the reasons behind P1/P2/P5).

Full-size SVD-XT architecture with random weights (seed 0), UNet fp16, one denoise step's UNet work
(both CFG branches), at case A (512x512x24) or B (576x1024x25).

Time: per configuration, the synchronised wall time of one step, the GPU kernel time inside it
(torch.profiler), the GPU busy fraction (kernel time / wall time: below ~0.9 the step waits on Python and
kernel launches, which CUDA graphs remove), the kernel count, the kernel time by kind (GEMM/conv,
attention, normalisation, elementwise/copy) and the same step replayed from a captured CUDA graph.

Memory: one ``generate`` of ours-lossless (2 steps, whole-model placement as bench/engine.py) under
``torch.cuda.memory._record_memory_history``: the torch peak per phase, the live allocations at the
run's peak grouped by the code that made them, and the gap between NVML's process figure and torch's
reserved memory (CUDA context, cuBLAS/cuDNN workspaces).

    python bench/engine_profile.py --out $OUT/engine_profile.json      # H100, ~3 minutes
    python bench/engine_profile.py --smoke --out /tmp/profile.json     # demo model on the CPU, logic check
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import new_report, write_report  # noqa: E402
from engine import CASES, SMOKE_CASES, MemoryProbe, build_pipeline, free, test_image  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lowvram_studio.engine.chunking import split_cfg_call  # noqa: E402
from lowvram_studio.engine.events import Phase  # noqa: E402
from lowvram_studio.engine.geglu import remove_geglu_halves  # noqa: E402
from lowvram_studio.engine.placement import clear_placement  # noqa: E402
from lowvram_studio.settings_adapter import generate, prepare_pipeline  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

logger = logging.getLogger("bench.engine_profile")
MIB = 2**20

# name: (chunking overrides, CFG split, extras); every row: UNet fp16, weights on the GPU. Extras: "geglu" keeps
# the engine's GEGLU-halves hook (engine/geglu.py; removed otherwise), "channels_last" stores conv weights NHWC.
LOSSLESS = {"spatial_chunk": 5, "temporal_chunk": 2304, "ff_chunk": 4096}
SMOKE_LOSSLESS = {"spatial_chunk": 2, "temporal_chunk": 16, "ff_chunk": 64}
ALL_CHUNKS = ("spatial_chunk", "temporal_chunk", "ff_chunk")
TIME_CONFIGS: dict[str, tuple[tuple[str, ...], bool, tuple[str, ...]]] = {
    "batch-2 (diffusers-fp16's UNet call)": ((), False, ()),
    "batch-2 + GEGLU halves": ((), False, ("geglu",)),
    "cfg split": ((), True, ()),
    "cfg split + spatial chunk": (("spatial_chunk",), True, ()),
    "cfg split + temporal chunk": (("temporal_chunk",), True, ()),
    "cfg split + ff chunk": (("ff_chunk",), True, ()),
    "all chunks, diffusers GEGLU": (ALL_CHUNKS, True, ()),
    "ours-lossless (all chunks + GEGLU halves)": (ALL_CHUNKS, True, ("geglu",)),
    "ours-lossless + channels-last": (ALL_CHUNKS, True, ("geglu", "channels_last")),
}
KINDS = (  # kernel name fragments -> kind; first match wins
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("gemm/conv", ("gemm", "conv", "cutlass", "sm90_xmma", "nvjet", "implicit", "wgrad", "dgrad")),
    ("normalisation", ("norm", "welford")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
)


def settings_for(case: tuple[int, int, int], chunks: dict[str, int], cfg_split: bool, device: str, steps: int,
                 offload: str = "none") -> RunSettings:
    height, width, frames = case
    return RunSettings.from_dict({
        "height": height, "width": width, "num_frames": frames, "num_inference_steps": steps, "seed": 0,
        "device": device, "unet_dtype": "fp16", "vae_dtype": "fp32", "encoder_dtype": "fp32",
        "cfg_split": cfg_split, "offload": offload, **chunks,
    }).validate()


def unet_inputs(unet: torch.nn.Module, case: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch-2 (both CFG branches) UNet input in the UNet's dtype."""
    height, width, frames = case
    dtype = next(unet.parameters()).dtype
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(2, frames, 8, height // 8, width // 8, generator=generator).to(device, dtype)
    return {
        "sample": sample,
        "encoder_hidden_states": torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator).to(device, dtype),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype),
    }


def step_function(unet: torch.nn.Module, inputs: dict[str, torch.Tensor], cfg_split: bool) -> Callable[[], torch.Tensor]:
    """One step's UNet work, as the sampler's predict_noise does it."""
    timestep = torch.tensor(1.0, device=inputs["sample"].device)

    def call(sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return unet(sample, timestep, **kwargs, return_dict=False)[0]

    sample = inputs["sample"]
    kwargs = {k: v for k, v in inputs.items() if k != "sample"}
    if cfg_split:
        return lambda: split_cfg_call(call, sample, **kwargs)
    return lambda: call(sample, **kwargs)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_seconds(step: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median synchronised wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(p in lowered for p in parts)), "elementwise/other")


def kernel_profile(step: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Kernel time and count of one step, by kind (CUDA only; on the CPU: operator count)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    by_kind: dict[str, float] = collections.defaultdict(float)
    kernels = 0
    total_us = 0.0
    top: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            kernels += 1
            total_us += us
            by_kind[kernel_kind(event.name)] += us
            top[event.name[:80]] += us
    ops = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"))
    averages = [a for a in prof.key_averages() if a.key.startswith("aten::")]
    self_ms = lambda a: getattr(a, "self_device_time_total", 0) / 1000  # noqa: E731
    top_ops = {f"{a.key} x{a.count}": round(self_ms(a), 2) for a in sorted(averages, key=self_ms, reverse=True)[:10]}
    return {
        "kernel_ms": total_us / 1000,
        "kernels": kernels,
        "aten_ops": ops,
        "ms_by_kind": {k: round(v / 1000, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v / 1000, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]},
        "top_ops_self_device_ms": top_ops,
    }


def graph_replay_seconds(step: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float | None, str]:
    """The same step captured once into a CUDA graph and replayed: the launch-free time."""
    if device.type != "cuda":
        return None, "no CUDA"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        seconds = wall_seconds(graph.replay, device, repeats)
        pool_mib = torch.cuda.memory_reserved() / MIB
        del graph
        return seconds, f"reserved with the graph {pool_mib:.0f} MiB"
    except Exception as error:  # capture refuses some ops (host syncs): report why, keep the matrix going
        logger.warning("CUDA graph capture failed: %s", error)
        return None, f"capture failed: {str(error).splitlines()[0][:120]}"


def conv_weight_layout(unet: torch.nn.Module, layout: torch.memory_format) -> None:
    """2-D convolution weights in ``layout`` (``Module.to(memory_format=...)`` refuses the UNet's 3-D convs)."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=layout)


def time_rows(pipeline, case, device: torch.device, repeats: int, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    lossless = SMOKE_LOSSLESS if smoke else LOSSLESS
    for name, (keys, cfg_split, extras) in TIME_CONFIGS.items():
        chunks = {k: lossless[k] for k in keys}
        prepare_pipeline(pipeline, settings_for(case, chunks, cfg_split, device.type, 1), device)
        if "geglu" not in extras:
            remove_geglu_halves(pipeline.unet)
        if "channels_last" in extras:
            conv_weight_layout(pipeline.unet, torch.channels_last)
        inputs = unet_inputs(pipeline.unet, case, device)
        with torch.inference_mode():
            step = step_function(pipeline.unet, inputs, cfg_split)
            wall_seconds(step, device, 1)  # warm-up (cuDNN/cuBLAS algorithm choice)
            seconds = wall_seconds(step, device, repeats)
            kernels = kernel_profile(step, device)
            graph_seconds, graph_note = graph_replay_seconds(step, device, repeats)
        row = {
            "config": name, "chunks": chunks, "cfg_split": cfg_split, "extras": list(extras), "seconds_per_step": seconds,
            "graph_seconds_per_step": graph_seconds, "graph_note": graph_note, **kernels,
            "busy_fraction": kernels["kernel_ms"] / 1000 / seconds if kernels["kernels"] else None,
        }
        logger.info("%s: %.3f s/step, busy %s, graph %s", name, seconds, row["busy_fraction"], graph_seconds)
        rows.append(row)
        conv_weight_layout(pipeline.unet, torch.contiguous_format)
        del inputs, step
        free(device)
    clear_placement(pipeline)
    return rows


# ---- memory at the peak ----------------------------------------------------------------------------
def allocation_site(frames: list[dict[str, Any]], depth: int = 3) -> str:
    """The innermost frames in our code or diffusers (innermost first): where an allocation came from."""
    names = []
    for frame in frames:
        path = frame.get("filename", "")
        if "lowvram_studio" in path or "diffusers" in path or "accelerate" in path:
            short = path.split("site-packages/")[-1].split("lowvram_studio/")[-1].replace("diffusers/models/", "")
            names.append(f"{short}:{frame.get('line')} {frame.get('name')}")
            if len(names) == depth:
                break
    return " < ".join(names) or "other (torch internals)"


def peak_allocations(snapshot: dict[str, Any], top: int = 14) -> dict[str, Any]:
    """Replay the allocator trace: the peak of live allocated bytes and who held them at that moment."""
    trace = snapshot["device_traces"][0] if snapshot["device_traces"] else []
    live: dict[int, int] = {}
    current = peak = peak_index = 0
    for index, entry in enumerate(trace):
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
            current += entry["size"]
            if current > peak:
                peak, peak_index = current, index
        elif entry["action"] == "free_completed" and entry["addr"] in live:
            current -= live.pop(entry["addr"])
    holders: dict[int, dict[str, Any]] = {}
    for entry in trace[: peak_index + 1]:
        if entry["action"] == "alloc":
            holders[entry["addr"]] = entry
        elif entry["action"] == "free_completed":
            holders.pop(entry["addr"], None)
    by_site: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for entry in holders.values():
        site = allocation_site(entry.get("frames", []))
        by_site[site][0] += entry["size"]
        by_site[site][1] += 1
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][0])
    return {
        "trace_entries": len(trace),
        "peak_live_mib": round(peak / MIB, 1),
        "peak_at_entry": peak_index,
        "sites": [{"site": s, "mib": round(b / MIB, 1), "blocks": n} for s, (b, n) in ranked[:top]],
        "rest_mib": round(sum(b for _, (b, _) in ranked[top:]) / MIB, 1),
    }


def memory_profile(pipeline, case, device: torch.device, smoke: bool) -> dict[str, Any]:
    """One 2-step generate of ours-lossless with whole-model placement: torch peak per phase, the peak's holders."""
    settings = settings_for(case, SMOKE_LOSSLESS if smoke else LOSSLESS, True, device.type, 2, offload="model")
    settings = RunSettings.from_dict({**settings.to_dict(), "decode_frames": 5, "vae_tile": 0 if smoke else 256})
    image = test_image(case[1], case[0])
    result: dict[str, Any] = {"settings": settings.to_dict()}
    if device.type != "cuda":
        generate(pipeline, image, settings)
        return {**result, "note": "memory history needs CUDA"}
    probe = MemoryProbe(device)
    phase_peaks: dict[str, float] = {}
    current: list[str] = []

    def on_event(event) -> None:
        if current and event.phase.value != current[-1]:
            phase_peaks[current[-1]] = max(phase_peaks.get(current[-1], 0), torch.cuda.max_memory_allocated() / MIB)
            torch.cuda.reset_peak_memory_stats()
        current.append(event.phase.value)

    generate(pipeline, image, settings)  # warm-up: placement hooks, cuDNN algorithm choice
    free(device)
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    try:
        generate(pipeline, image, settings, on_event=on_event)
        synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    result.update(
        phase_torch_peak_mib={k: round(v) for k, v in phase_peaks.items() if k != Phase.DONE.value},
        process_now_mib=round(probe.process() / MIB),
        reserved_now_mib=round(torch.cuda.memory_reserved() / MIB),
        allocated_now_mib=round(torch.cuda.memory_allocated() / MIB),
        context_and_workspaces_mib=round((probe.process() - torch.cuda.memory_reserved()) / MIB),
        peak=peak_allocations(snapshot),
    )
    clear_placement(pipeline)
    free(device)
    return result


def markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        f"Case {report['case']} {report['case_size']}, UNet fp16, one denoise step (both CFG branches), median of "
        f"{report['repeats']} synchronised steps; busy = GPU kernel time / wall time; graph = the same step "
        "replayed from one captured CUDA graph.",
        "",
        "| config | s/step | kernel ms | busy | kernels | graph s/step | ms by kind |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["time"]:
        busy = f"{r['busy_fraction']:.2f}" if r["busy_fraction"] is not None else "n/a"
        graph = f"{r['graph_seconds_per_step']:.3f}" if r["graph_seconds_per_step"] else r["graph_note"]
        kinds = ", ".join(f"{k} {v}" for k, v in r["ms_by_kind"].items())
        lines.append(f"| {r['config']} | {r['seconds_per_step']:.3f} | {r['kernel_ms']:.0f} | {busy} | "
                     f"{r['kernels']} | {graph} | {kinds} |")
    for r in report["time"]:
        if r["config"].startswith(("all chunks", "ours-lossless (")) and r["top_ops_self_device_ms"]:
            ops = ", ".join(f"`{k}` {v}" for k, v in r["top_ops_self_device_ms"].items())
            lines += ["", f"Top operators by GPU self time, {r['config']} (ms): {ops}"]
    memory = report["memory"]
    if "peak" in memory:
        peak = memory["peak"]
        lines += [
            "",
            f"Memory, ours-lossless generate (2 steps, model placement, decode chunk 5, tiles 256): torch peak per "
            f"phase {memory['phase_torch_peak_mib']} MiB; process - reserved (context, workspaces) "
            f"{memory['context_and_workspaces_mib']} MiB. Live at the run's peak ({peak['peak_live_mib']} MiB):",
            "",
            "| allocated at | MiB | blocks |",
            "|---|---|---|",
            *[f"| `{s['site']}` | {s['mib']} | {s['blocks']} |" for s in peak["sites"]],
            f"| (the rest) | {peak['rest_mib']} | |",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/engine_profile_{today}.json"))
    parser.add_argument("--case", choices=sorted(CASES), default="B")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU at a tiny size (logic check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as bench/engine.py
    device = torch.device("cpu" if args.smoke else "cuda")
    case = (SMOKE_CASES if args.smoke else CASES)[args.case]
    pipeline = build_pipeline(torch.float32, device if args.smoke else torch.device("cpu"), args.smoke)
    report = new_report(case=args.case, case_size=list(case), repeats=args.repeats,
                        model="demo (smoke)" if args.smoke else "SVD-XT architecture, random weights seed 0")
    report["time"] = time_rows(pipeline, case, device, args.repeats, args.smoke)
    report["memory"] = memory_profile(pipeline, case, device, args.smoke)
    report["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_report(args.out, "Engine profile", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
