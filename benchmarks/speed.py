"""Speed and cost: training throughput and peak memory, transplant latency, inference after transplant.

    .venv/bin/python benchmarks/speed.py --quick    # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --full     # ~15 min
    .venv/bin/python benchmarks/speed.py --loop     # ~6 min: not_hub's training loop vs a plain transformers.Trainer
    .venv/bin/python benchmarks/speed.py --load     # ~2 min: organ load + graft vs reading its bytes + their sha256
    .venv/bin/python benchmarks/speed.py --precision  # ~6 min: training tokens/s, float32 against bf16 autocast

Training methods run the same plain loop (forward, backward, AdamW step) at the same batch size and sequence length,
each in its own process so its peak memory (max RSS) is its own: NOT organ standalone (the paper's wrapper), NOT
organ in situ, peft LoRA (r=8, alpha=16, attention projections) and full fine-tuning. Achieved FLOP/s uses an
analytic count (2 FLOPs per weight per token forward; backward = activation gradients through every layer below the
loss down to the first trainable one, plus weight gradients of trainable layers) against this machine's dense fp32
matmul rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Timer, machine, preset_parser, write_json, write_markdown  # noqa: E402

PRESETS = {
    "quick": dict(batch=4, seq=256, warmup=1, steps=3, matmul_n=1024, gen_tokens=32, latency_repeats=3),
    "full": dict(batch=4, seq=256, warmup=2, steps=8, matmul_n=2048, gen_tokens=64, latency_repeats=10),
}
METHODS = (
    "organ_standalone",
    "organ_in_situ",
    "organ_in_situ_cached",
    "organ_tail_cached",
    "lora_r8",
    "full_finetune",
)
ORGAN = (10, 13)
TAIL = (27, 30)  # the last 3 of SmolLM2's 30 layers: in situ there, nothing sits above the organ


# ------------------------------------------------------------------------------------------- one method, one process


def worker(method: str, batch: int, seq: int, warmup: int, steps: int, seed: int = 0, precision: str = "fp32") -> dict:
    """One method's training steps; `precision` "bf16": forward and backward under CPU bf16 autocast (float32 master
    weights and optimizer, as `mixed_precision="bf16"` trains)."""
    import torch
    from common import load_smollm2

    import not_hub
    from not_hub.shells import standalone_shell

    torch.manual_seed(seed)
    model, _ = load_smollm2()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "organ_standalone":
        organ = not_hub.extract_organ(model, layer_range=ORGAN)
        net = standalone_shell(organ, model)
        params = list(organ.parameters())
    elif method == "organ_in_situ":
        organ = not_hub.extract_organ(model, layer_range=ORGAN)
        transplant = organ.transplant_into(model, position=ORGAN[0])  # a throwaway worker process: never explanted
        net, params = model, [p for layer in transplant.layers for p in layer.parameters()]
    elif method in ("organ_in_situ_cached", "organ_tail_cached"):
        from not_hub.prefix_cache import CachedPrefixModel, PrefixCache

        layer_range = ORGAN if method == "organ_in_situ_cached" else TAIL
        organ = not_hub.extract_organ(model, layer_range=layer_range)
        transplant = organ.transplant_into(model, position=layer_range[0])  # throwaway worker: never explanted
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        t_cache = time.perf_counter()
        cache = PrefixCache.build(model, layer_range[0], [ids], batch_size=batch)
        cache_build_s = time.perf_counter() - t_cache
        net, params = CachedPrefixModel(model, cache), [p for layer in transplant.layers for p in layer.parameters()]
    elif method == "lora_r8":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
        )
        params = [p for p in net.parameters() if p.requires_grad]
    elif method == "full_finetune":
        net, params = model, list(model.parameters())
    else:
        raise ValueError(method)
    trainable = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in trainable)
    net.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "method": method,
        "precision": precision,
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_second": batch * seq * len(times) / sum(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded / 1024,
        **(
            {"cache_build_s": cache_build_s, "cache_bytes_per_token": cache.bytes_per_token}
            if method.endswith("_cached")
            else {}
        ),
    }


# ---------------------------------------------------------------- --loop: not_hub's loop vs a plain transformers.Trainer

LOOP = dict(batch=4, seq=256, warmup=3, steps=12, corpus_tokens=1_000_000)
LOOP_RUNS = [(kind, what) for what in ("organ", "lora") for kind in ("plain", "not_hub")]


def loop_worker(kind: str, what: str, batch: int, seq: int, warmup: int, steps: int, corpus_tokens: int) -> dict:
    """One training run on SmolLM2, float32, constant rate, of `what` (the in-situ organ [10, 13) uncached, or peft
    LoRA r=8 on every linear layer) through `kind`: `not_hub` (`fit_parameters`, the loop every not_hub training
    function uses) or `plain` (a `transformers.Trainer` with the same model, data, batch size and precision, as a user
    would write it: `get_organ_model` / `get_peft_model`, then `Trainer(...).train()`). `first_step`: `train_organ`
    with its defaults on a corpus of `corpus_tokens` tokens, timed to its first optimizer step."""
    import datasets
    import torch
    from common import load_smollm2

    import not_hub
    from not_hub.data import BlockData

    torch.manual_seed(0)
    model, _ = load_smollm2()
    g = torch.Generator().manual_seed(0)
    n_blocks = corpus_tokens // seq if kind == "first_step" else batch * (warmup + steps)
    ids = torch.randint(0, model.config.vocab_size, (n_blocks, seq), generator=g)
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    data = BlockData(train, None, {"block_size": seq})
    organ = not_hub.extract_organ(model, layer_range=ORGAN)
    stamps: list[float] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: stamps.append(time.perf_counter()))
    t0 = time.perf_counter()
    if kind == "first_step":
        metrics = not_hub.train_organ(
            organ, model, data, max_steps=2, batch_size=batch, progress=False, mixed_precision="no"
        )
        cache = organ.config.training["prefix_cache"]
        return {
            "kind": kind,
            "corpus_tokens": n_blocks * seq,
            "first_step_s": metrics.first_step_s,
            "call_s": time.perf_counter() - t0,
            "cache_bytes_per_token": cache["bytes_per_token"],
            "cache_bytes_for_corpus": cache["bytes_per_token"] * n_blocks * seq,
            "cache_memory_limit": cache["memory_limit"],
            "cache_disk_limit": cache["disk_limit"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    if what == "organ":
        model = not_hub.get_organ_model(organ, model)  # the organ grafted, everything else frozen
    else:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "not_hub":
        from not_hub.training import OrganTrainingArguments, fit_parameters

        args = OrganTrainingArguments(
            max_steps=warmup + steps, lr=1e-3, batch_size=batch, progress=False, warmup_ratio=0.0,
            mixed_precision="no", trainer_args={"lr_scheduler_type": "constant"},
        )  # fmt: skip
        fit_parameters(model, params, data, args, kind)
    else:
        from transformers import Trainer, TrainingArguments

        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                out, max_steps=warmup + steps, learning_rate=1e-3, per_device_train_batch_size=batch,
                lr_scheduler_type="constant", report_to="none", save_strategy="no", disable_tqdm=True,
                dataloader_pin_memory=False, logging_steps=1,
            )  # fmt: skip
            Trainer(model=model, args=args, train_dataset=train, data_collator=not_hub.collate_blocks).train()
    durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][warmup:]
    return {
        "kind": kind,
        "what": what,
        "steps_timed": len(durations),
        "seconds_per_step": sum(durations) / len(durations),
        "tokens_per_second": batch * seq * len(durations) / sum(durations),
        "first_step_s": stamps[1] - t0 if len(stamps) > 1 else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def loop_main() -> None:
    t_start = time.time()
    rows: dict[str, list[dict]] = {}
    order = LOOP_RUNS + LOOP_RUNS[::-1] + [("first_step", "organ")]  # each pair twice, in mirrored order: drift shows
    for kind, what in order:
        print(f"loop: {kind} {what} ...", flush=True)
        opts = (f"--{k.replace('_', '-')}={v}" for k, v in LOOP.items())
        r = run_worker("loop", f"--kind={kind}", f"--what={what}", *opts)
        rows.setdefault(f"{kind}/{what}", []).append(r)
    rate = {k: sum(r["tokens_per_second"] for r in v) / len(v) for k, v in rows.items() if k != "first_step/organ"}
    first = rows["first_step/organ"][0]
    ratios = {what: rate[f"not_hub/{what}"] / rate[f"plain/{what}"] for what in ("organ", "lora")}
    result = {
        "settings": LOOP,
        "machine": machine(),
        "organ": list(ORGAN),
        "runs": rows,
        "tokens_per_second": rate,
        "not_hub_over_plain_trainer": ratios,
        "first_step": first,
        "command": "benchmarks/speed.py --loop",
        "wall_clock_s": round(time.time() - t_start, 1),
    }
    write_json("speed_loop", result)
    gib = 2**30
    md = [
        "### not_hub's training loop against a plain transformers.Trainer",
        "",
        f"SmolLM2-135M, float32, batch {LOOP['batch']} x {LOOP['seq']} tokens, constant rate, {LOOP['steps']} timed "
        f"steps after {LOOP['warmup']} warm-up steps, two runs each in mirrored order, each in its own process. The "
        f"in-situ organ {list(ORGAN)} runs uncached in both (the loop is what differs); LoRA r=8 on every linear layer.",
        "",
        "| what | loop | tokens/s (runs) | mean | peak RSS (MB) |",
        "|---|---|---|---|---|",
        *[
            f"| {key.split('/')[1]} | {key.split('/')[0]} | "
            f"{', '.join(format(r['tokens_per_second'], '.0f') for r in rows[key])} | {rate[key]:.0f} | "
            f"{max(r['peak_rss_mb'] for r in rows[key]):.0f} |"
            for key in rate
        ],
        "",
        "not_hub / plain Trainer, tokens/s: "
        + ", ".join(f"{what} **{ratio:.3f}x**" for what, ratio in ratios.items())
        + ".",
        "",
        f"Time to the first step on a {first['corpus_tokens'] / 1e6:.2f}M-token corpus (`train_organ`, in situ, cached "
        f"prefix, the defaults): **{first['first_step_s']:.2f} s** of the budget. Cache for the whole corpus: "
        f"{first['cache_bytes_per_token']:,} bytes/token x {first['corpus_tokens']:,} tokens = "
        f"{first['cache_bytes_for_corpus'] / gib:.2f} GiB, of which at most {first['cache_memory_limit'] / gib:.0f} GiB "
        f"in memory and at most {first['cache_disk_limit'] / gib:.0f} GiB in an unnamed temporary file (beyond both, "
        f"recomputed). Peak RSS of that run: {first['peak_rss_mb']:.0f} MB.",
        "",
    ]
    write_markdown("speed_loop", "\n".join(md))
    print("\n".join(md))


PRECISION_METHODS = ("organ_in_situ_cached", "organ_tail_cached", "organ_standalone", "lora_r8")


def precision_main(batch: int = 4, seq: int = 256, warmup: int = 2, steps: int = 8) -> None:
    """Training tokens/s in float32 and in bf16 autocast, each method in its own process, the two precisions
    interleaved; achieved FLOP/s against each precision's measured matmul peak (2048^3)."""
    import torch
    from common import load_smollm2

    from not_hub.precision import cpu_flags, resolve_mixed_precision

    config = load_smollm2()[0].config
    peaks = {"fp32": matmul_flops(2048), "bf16": matmul_flops(2048, dtype=torch.bfloat16)}
    rows = []
    for method in PRECISION_METHODS:
        for precision in ("fp32", "bf16"):
            print(f"precision: {method} {precision} ...", flush=True)
            r = run_worker(method, *(f"--{k}={v}" for k, v in dict(batch=batch, seq=seq, warmup=warmup, steps=steps).items()),
                           f"--precision={precision}")  # fmt: skip
            r["achieved_flops"] = flops_per_token(method, config, seq) * r["tokens_per_second"]
            r["fraction_of_matmul_peak"] = r["achieved_flops"] / peaks[precision]
            rows.append(r)
    by = {(r["method"], r["precision"]): r for r in rows}
    result = {
        "machine": machine(),
        "native_bf16_flags": sorted((cpu_flags() or set()) & {"avx512_bf16", "amx_bf16", "bf16"}),
        "auto_picks": resolve_mixed_precision("auto"),
        "matmul_flops_per_second": peaks,
        "settings": dict(batch=batch, seq=seq, warmup=warmup, steps=steps),
        "runs": rows,
        "bf16_over_fp32": {
            m: by[(m, "bf16")]["tokens_per_second"] / by[(m, "fp32")]["tokens_per_second"] for m in PRECISION_METHODS
        },  # fmt: skip
        "command": "benchmarks/speed.py --precision",
    }
    write_json("speed_precision", result)
    md = [
        "### Training in bf16 autocast against float32 (speed.py --precision)",
        "",
        f"SmolLM2-135M, batch {batch} x {seq}, {steps} timed steps after {warmup}, each run in its own process. Matmul "
        f"peak (2048^3): float32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
        f"({peaks['bf16'] / peaks['fp32']:.2f}x). CPU flags: {', '.join(result['native_bf16_flags']) or 'none'}; "
        f"`mixed_precision='auto'` picks **{result['auto_picks']}** here.",
        "",
        "| method | float32 tokens/s | bf16 tokens/s | bf16 / float32 | float32 % of its peak | bf16 % of its peak |",
        "|---|---|---|---|---|---|",
        *[
            f"| {m} | {by[(m, 'fp32')]['tokens_per_second']:.0f} | {by[(m, 'bf16')]['tokens_per_second']:.0f} | "
            f"{result['bf16_over_fp32'][m]:.2f}x | {100 * by[(m, 'fp32')]['fraction_of_matmul_peak']:.0f}% | "
            f"{100 * by[(m, 'bf16')]['fraction_of_matmul_peak']:.0f}% |"
            for m in PRECISION_METHODS
        ],
        "",
    ]
    write_markdown("speed_precision", "\n".join(md))
    print("\n".join(md))


def run_worker(*args: str) -> dict:
    """Run `speed.py --worker ...` in a fresh process (its own peak memory) and parse the JSON it prints last."""
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- FLOP accounting


def flops_per_token(method: str, config, seq: int) -> float:
    """Analytic training FLOPs per token (see the module docstring)."""
    d, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    layer_weights = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    f_layer = 2 * layer_weights + 2 * seq * d  # + causal attention scores and mixing (~T/2 keys, x2 matmuls)
    f_head = 2 * d * config.vocab_size
    k = ORGAN[1] - ORGAN[0]
    if method == "organ_standalone":  # forward k layers + head; backward: head activations, organ 2x
        return k * f_layer + f_head + f_head + 2 * k * f_layer
    if method == "organ_in_situ":  # forward all; backward: head + layers above the organ, organ 2x
        above = L - ORGAN[1]
        return L * f_layer + f_head + f_head + above * f_layer + 2 * k * f_layer
    if method in ("organ_in_situ_cached", "organ_tail_cached"):  # no prefix: from the organ up, forward + backward
        start, stop = ORGAN if method == "organ_in_situ_cached" else TAIL
        above = L - stop
        return (L - start) * f_layer + f_head + f_head + above * f_layer + 2 * k * f_layer
    if method == "lora_r8":  # forward all; backward: activation gradients through everything (LoRA everywhere)
        return 2 * (L * f_layer + f_head)
    if method == "full_finetune":
        return 3 * (L * f_layer + f_head)
    raise ValueError(method)


def matmul_flops(n: int, repeats: int = 5, dtype=None) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    with Timer() as t:
        for _ in range(repeats):
            torch.matmul(a, b)
    return 2 * n**3 * repeats / t.seconds


# ------------------------------------------------------------------------------------------- transplant latency


def latency_worker(repeats: int) -> dict:
    """Organ load from a local Hub cache + graft vs a plain safetensors read vs peft loading a LoRA adapter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    from hub_server import LocalHub

    hub = LocalHub().start()
    home = tempfile.mkdtemp()
    os.environ.update(
        HF_ENDPOINT=hub.endpoint, HF_HOME=home, HF_HUB_DISABLE_XET="1", HF_TOKEN="x", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    import torch
    from common import load_smollm2
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    import not_hub

    recipient, _ = load_smollm2()
    organ = not_hub.extract_organ(recipient, layer_range=ORGAN)
    organ.push_to_hub("bench/organ")
    folder, _ = not_hub.hub.resolve_checkpoint("bench/organ")  # fills the cache
    adapter_dir = Path(home) / "adapter"
    lora = get_peft_model(
        load_smollm2()[0], LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    lora.save_pretrained(adapter_dir)
    del lora
    os.environ["HF_HUB_OFFLINE"] = "1"
    timings = {
        "organ_load_and_graft": [],
        "organ_load": [],
        "graft": [],
        "safetensors_read": [],
        "safetensors_read_copy": [],
        "safetensors_read_sha256": [],
        "peft_lora_load": [],
    }
    for _ in range(repeats):
        with Timer() as t_load:
            loaded = not_hub.OrganModel.from_pretrained("bench/organ", local_files_only=True)
        with Timer() as t_graft:  # the graft alone is timed; explant follows at once
            transplant = loaded.transplant_into(recipient, position=ORGAN[0])
        transplant.explant()
        timings["organ_load"].append(t_load.seconds)
        timings["graft"].append(t_graft.seconds)
        timings["organ_load_and_graft"].append(t_load.seconds + t_graft.seconds)
        with Timer() as t_read:
            load_file(folder / "model.safetensors")
        timings["safetensors_read"].append(t_read.seconds)
        with Timer() as t_copy:  # a read that touches every byte (load_file alone may only map the file)
            {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
        timings["safetensors_read_copy"].append(t_copy.seconds)
        with Timer() as t_sha:  # the floor for a checked load: read every byte into memory, hash every tensor
            for tensor in load_file(folder / "model.safetensors").values():
                hashlib.sha256(memoryview(tensor.clone().reshape(-1).view(torch.uint8).numpy())).hexdigest()
        timings["safetensors_read_sha256"].append(t_sha.seconds)
        with Timer() as t_peft:
            peft_model = PeftModel.from_pretrained(recipient, adapter_dir)
        timings["peft_lora_load"].append(t_peft.seconds)
        recipient = peft_model.unload()
    hub.stop()
    size_mb = (folder / "model.safetensors").stat().st_size / 2**20
    return {
        "organ_file_mb": size_mb,
        "median_seconds": {k: sorted(v)[len(v) // 2] for k, v in timings.items()},
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }


def load_main(repeats: int) -> None:
    """`--load`: is a checked organ load as fast as reading its bytes? Goal: load + graft <= 1.2x read + sha256."""
    latency = run_worker("latency", f"--repeats={repeats}")
    t = latency["median_seconds"]
    result = {
        "machine": machine(),
        "transplant_latency": latency,
        "load_and_graft_over_read_sha256": t["organ_load_and_graft"] / t["safetensors_read_sha256"],
        "load_over_read_sha256": t["organ_load"] / t["safetensors_read_sha256"],
        "command": f"benchmarks/speed.py --load --repeats {repeats}",
    }
    write_json("speed_load", result)
    md = [
        f"### Organ load (median of {repeats}, organ file {latency['organ_file_mb']:.1f} MB, SmolLM2 layers "
        f"[{ORGAN[0]}, {ORGAN[1]}), from the local Hub cache, {latency['torch_threads']} threads)",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in t.items()),
        "",
        f"Load + graft (strict: config against the weights' header, the organ built on `meta` and given the read "
        f"tensors, every tensor's sha256 checked on a thread while the next is read) / reading the same bytes + "
        f"their sha256 on one thread: "
        f"**{result['load_and_graft_over_read_sha256']:.2f}x** (goal <= 1.2x); the load alone "
        f"{result['load_over_read_sha256']:.2f}x.",
    ]
    write_markdown("speed_load", "\n".join(md))
    print("\n".join(md))


# --------------------------------------------------------------------------------------- inference after transplant


def inference(gen_tokens: int) -> dict:
    import torch
    from common import load_smollm2

    import not_hub

    model, tok = load_smollm2()
    organ = not_hub.extract_organ(model, layer_range=ORGAN)
    ids = tok("public static int fibonacci(int n) { if (n < 2) return n; return", return_tensors="pt").input_ids

    def rate() -> float:
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        with Timer() as t:
            out = model.generate(ids, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
        return (out.shape[1] - ids.shape[1]) / t.seconds

    with torch.no_grad():
        results = {"untouched": rate()}
        for mode, position in (("replace", 4), ("insert", 4), ("bridge", 4)):
            with organ.transplanted(model, position=position, mode=mode):
                results[mode] = rate()
    return {
        "tokens_per_second": results,
        "relative_to_untouched": {k: v / results["untouched"] for k, v in results.items()},
        "new_tokens": gen_tokens,
        "layers": {"untouched": 30, "replace": 30, "insert": 33, "bridge": 33},
    }


# ------------------------------------------------------------------------------------------------------ the report


def plot(training: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["method"] for r in training]
    axes[0].bar(names, [r["tokens_per_second"] for r in training], color="#4c72b0")
    axes[0].set_ylabel("training tokens / s")
    axes[1].bar(names, [r["peak_rss_mb"] for r in training], color="#dd8452")
    axes[1].set_ylabel("peak RSS (MB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = preset_parser(__doc__)
    parser.add_argument("--worker", choices=[*METHODS, "latency", "inference", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--loop", action="store_true", help="not_hub's training loop vs a plain transformers.Trainer")
    parser.add_argument("--load", action="store_true", help="organ load + graft vs reading its bytes + their sha256")
    parser.add_argument("--precision", nargs="?", const="compare", default=None,
                        help="alone: float32 against bf16 autocast, per method (a worker's own precision inside)")  # fmt: skip
    parser.add_argument("--kind", choices=["plain", "not_hub", "first_step"], help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=["organ", "lora"], help=argparse.SUPPRESS)
    for name in ("batch", "seq", "warmup", "steps", "repeats", "gen_tokens", "corpus_tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "loop":
        print(
            json.dumps(
                loop_worker(args.kind, args.what, args.batch, args.seq, args.warmup, args.steps, args.corpus_tokens)
            )
        )
        return
    if args.loop:
        loop_main()
        return
    if args.load:
        load_main(args.repeats or 20)
        return
    if args.worker in METHODS:
        precision = args.precision if args.precision in ("fp32", "bf16") else "fp32"
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.warmup, args.steps, precision=precision)))
        return
    if args.precision == "compare":
        precision_main()
        return
    if args.worker == "latency":
        print(json.dumps(latency_worker(args.repeats)))
        return
    if args.worker == "inference":
        print(json.dumps(inference(args.gen_tokens)))
        return

    name = "full" if args.full else "quick"
    preset = PRESETS[name]
    t_start = time.time()
    from common import load_smollm2
    from transformers import AutoConfig

    config = load_smollm2()[0].config
    assert isinstance(config, AutoConfig.for_model("llama").__class__)
    peak = matmul_flops(preset["matmul_n"])
    training = []
    for method in METHODS:
        print(f"training throughput: {method} ...", flush=True)
        r = run_worker(method, *(f"--{k}={preset[k]}" for k in ("batch", "seq", "warmup", "steps")))
        r["flops_per_token"] = flops_per_token(method, config, preset["seq"])
        r["achieved_flops"] = r["flops_per_token"] * r["tokens_per_second"]
        r["fraction_of_matmul_peak"] = r["achieved_flops"] / peak
        training.append(r)
    by = {r["method"]: r for r in training}
    ratios = {m: by["organ_standalone"]["tokens_per_second"] / by[m]["tokens_per_second"] for m in METHODS}
    tps = {m: by[m]["tokens_per_second"] for m in METHODS}
    in_situ_ratios = {
        "cached_over_uncached_in_situ": tps["organ_in_situ_cached"] / tps["organ_in_situ"],
        "tail_cached_over_lora_r8": tps["organ_tail_cached"] / tps["lora_r8"],
        "tail_cached_over_standalone": tps["organ_tail_cached"] / tps["organ_standalone"],
        "cached_in_situ_over_lora_r8": tps["organ_in_situ_cached"] / tps["lora_r8"],
    }
    print("transplant latency ...", flush=True)
    latency = run_worker("latency", f"--repeats={preset['latency_repeats']}")
    print("inference after transplant ...", flush=True)
    infer = run_worker("inference", f"--gen-tokens={preset['gen_tokens']}")
    result = {
        "preset": name,
        "settings": preset,
        "machine": machine(),
        "matmul_flops_per_second": peak,
        "training": training,
        "standalone_speedup_over": ratios,
        "in_situ_ratios": in_situ_ratios,
        "transplant_latency": latency,
        "inference": infer,
        "command": f"benchmarks/speed.py --{name}",
        "seed": 0,
        "wall_clock_s": round(time.time() - t_start, 1),
    }
    write_json(f"speed_{name}", result)
    plot(training, RESULTS / f"speed_{name}.png")
    write_markdown(f"speed_{name}", report(result))
    print(report(result))


def report(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"### Speed and cost ({r['preset']} preset: batch {s['batch']} x {s['seq']} tokens, fp32, "
        f"{r['machine']['torch_threads']} threads)",
        "",
        f"Dense fp32 matmul on this machine: {r['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s "
        f"({s['matmul_n']}x{s['matmul_n']}).",
        "",
        "| method | trainable params | tokens/s | NOT standalone speed-up | peak RSS (MB) | GFLOP/s achieved | "
        "of matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in r["training"]:
        lines.append(
            f"| {t['method']} | {t['trainable_parameters']:,} | {t['tokens_per_second']:.0f} | "
            f"{r['standalone_speedup_over'][t['method']]:.2f}x | {t['peak_rss_mb']:.0f} | "
            f"{t['achieved_flops'] / 1e9:.1f} | {t['fraction_of_matmul_peak']:.0%} |"
        )
    if "in_situ_ratios" in r:
        q = r["in_situ_ratios"]
        cached = next(t for t in r["training"] if t["method"] == "organ_in_situ_cached")
        lines += [
            "",
            f"In situ with the frozen prefix cached (`not_hub.prefix_cache`, {cached['cache_bytes_per_token']:,} bytes "
            f"per token, built once in {cached['cache_build_s']:.2f} s for this batch): "
            f"{q['cached_over_uncached_in_situ']:.2f}x the uncached in-situ rate at the middle slot "
            f"{list(ORGAN)}; {q['cached_in_situ_over_lora_r8']:.2f}x LoRA r=8. Tail organ {list(TAIL)}, cached: "
            f"{q['tail_cached_over_lora_r8']:.2f}x LoRA r=8 and {q['tail_cached_over_standalone']:.2f}x the standalone "
            "organ.",
        ]
    lat = r["transplant_latency"]["median_seconds"]
    lines += [
        "",
        f"Transplant latency (median of {r['transplant_latency']['repeats']}, organ file "
        f"{r['transplant_latency']['organ_file_mb']:.1f} MB, from the local Hub cache):",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in lat.items()],
        "",
        f"Organ load + graft (strict load with a sha256 check of every tensor, then the graft) vs a plain safetensors "
        f"read that copies every byte: {lat['organ_load_and_graft'] / lat['safetensors_read_copy']:.1f}x (vs a "
        f"lazy read: {lat['organ_load_and_graft'] / lat['safetensors_read']:.0f}x); vs peft loading a LoRA adapter "
        f"onto the same recipient: {lat['organ_load_and_graft'] / lat['peft_lora_load']:.2f}x.",
        "",
        f"Generation after transplant ({r['inference']['new_tokens']} greedy tokens, batch 1):",
        "",
        "| recipient | layers | tokens/s | relative to untouched |",
        "|---|---|---|---|",
        *[
            f"| {k} | {r['inference']['layers'][k]} | {v:.1f} | {r['inference']['relative_to_untouched'][k]:.2f} |"
            for k, v in r["inference"]["tokens_per_second"].items()
        ],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
