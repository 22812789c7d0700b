"""FLOP formula against an independent count, throughput/MFU arithmetic, and the W&B / console logger
(offline runs only, read back from disk)."""

from __future__ import annotations

import io
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_lite.models.config import BuildOptions, gpt2_config, llama_config
from megatron_lite.training.config import model_preset
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.training.config import compose
from megatron_lite.training.logging import (MetricsLogger, WandbSettings, console_line, describe_comm, format_metrics,
                                            is_secret_key, read_offline_run, scrub_argv, scrub_secrets,
                                            to_plain_config, validation_line)
from megatron_lite.training.metrics import (GIB, StepMetrics, StepTimer, host_peak_rss_bytes, memory_metrics,
                                            megatron_gpt_flops_per_token, model_flops_per_token)

SMALL = {
    "gpt2": gpt2_config(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64),
    "llama_gqa": llama_config(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              ffn_hidden_size=176, max_seq_len=64),
}
BATCH, SEQ = 2, 32


def counted_flops_per_token(cfg, recompute="none") -> float:
    """FLOPs of one forward + backward of the serial model, counted by torch's FlopCounterMode.

    The math SDPA backend is forced: on CPU the fused `_scaled_dot_product_flash_attention_for_cpu`
    has no FLOP formula registered, so with the default backend the counter misses the attention
    core (exactly 3 * 2 * 2 * s * h * L per token); the math backend runs it as two bmm's (over the
    full s x s matrix, the mask being applied element-wise), which are counted."""
    model = build_model(cfg, ParallelLayout.serial(), seed=0, options=BuildOptions(recompute=recompute))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(model(tokens), targets).mean().backward()
    return counter.get_total_flops() / (BATCH * SEQ)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_flops_per_token_matches_flop_counter(name):
    cfg = SMALL[name]
    assert model_flops_per_token(cfg, SEQ) == pytest.approx(counted_flops_per_token(cfg), rel=1e-12)


def test_recompute_flops_against_flop_counter():
    """The formula counts a whole extra forward of each layer (full) or of the attention core
    (selective). PyTorch's non-reentrant checkpoint stops recomputing once the last saved tensor is
    back. Full: down_proj is the layer's last matmul, but its function (layers/weight_grad.py, a custom
    autograd Function so that W can be deferred) packs its saved tensors after its forward, so it is
    recomputed too: exactly the formula. Selective: p @ v (2 s h per layer) is skipped."""
    cfg = SMALL["llama_gqa"]
    h, L = cfg.hidden_size, cfg.num_layers
    skipped = {"full": 0, "selective": L * 2 * SEQ * h}
    base = model_flops_per_token(cfg, SEQ)
    for recompute in ("full", "selective"):
        formula = model_flops_per_token(cfg, SEQ, recompute)
        assert formula > base
        assert counted_flops_per_token(cfg, recompute) == pytest.approx(formula - skipped[recompute], rel=1e-12)


def test_flops_against_megatron_closed_form():
    for cfg, seq in ((SMALL["gpt2"], SEQ), (model_preset("gpt2_124m"), 1024), (model_preset("gpt2_tiny"), 128)):
        assert model_flops_per_token(cfg, seq) == pytest.approx(megatron_gpt_flops_per_token(cfg, seq), rel=1e-12)
    # GPT-2 124M at s=1024, vocabulary padded to 50304: 0.855 GFLOP per token (50304 = 128 * 393 = 384 * 131).
    gpt2 = model_preset("gpt2_124m")
    assert model_flops_per_token(gpt2, 1024) == pytest.approx(72 * 12 * 768**2 + 12 * 12 * 768 * 1024 + 6 * 768 * 50304)
    # Padding to the TP multiple is what the head really multiplies.
    assert model_flops_per_token(gpt2, 1024, tp_size=5) > model_flops_per_token(gpt2, 1024)
    with pytest.raises(ValueError, match="closed form"):
        megatron_gpt_flops_per_token(SMALL["llama_gqa"], SEQ)
    with pytest.raises(ValueError, match="recompute"):
        model_flops_per_token(gpt2, 1024, "some")


def test_gqa_saves_kv_projection_flops():
    gqa = SMALL["llama_gqa"]
    mha = gqa.with_(num_kv_heads=None)
    h, kv_width = gqa.hidden_size, gqa.kv_heads * gqa.head_dim
    saved = 3 * gqa.num_layers * 2 * 2 * h * (h - kv_width)  # k and v, forward + backward
    assert model_flops_per_token(mha, SEQ) - model_flops_per_token(gqa, SEQ) == pytest.approx(saved)


def test_step_metrics_and_timer():
    m = StepMetrics.compute(step_time_s=2.0, tokens_per_step=4096, flops_per_token=1e9, world_size=4,
                            peak_flops_per_device=1e12, hardware_flops_per_token=1.5e9)
    assert m.tokens_per_s == 2048
    assert m.tflops_per_rank == pytest.approx(2048 * 1e9 / 4 / 1e12)
    assert m.mfu == pytest.approx(0.512) and m.hfu == pytest.approx(0.768)
    logged = m.as_dict()
    assert set(logged) == {"perf/step_time_s", "perf/tokens_per_s", "perf/tflops_per_rank", "perf/mfu", "perf/hfu"}
    unknown_peak = StepMetrics.compute(1.0, 10, 1.0, 1, None)
    assert unknown_peak.mfu is None and "perf/mfu" not in unknown_peak.as_dict()
    with pytest.raises(ValueError):
        StepMetrics.compute(0.0, 10, 1.0, 1, 1e12)

    timer = StepTimer()
    with pytest.raises(RuntimeError):
        timer.stop()
    with timer:
        time.sleep(0.02)
    assert 0.015 < timer.elapsed < 1.0
    timer.start()
    assert timer.stop() >= 0


def test_secret_scrubbing_rules():
    assert all(is_secret_key(k) for k in ("api_key", "WANDB_API_KEY", "wandbApiKey", "hf_token", "authToken",
                                          "client_secret", "DB_Password", "secrets", "aws-access-key"))
    assert not any(is_secret_key(k) for k in ("tokens_per_step", "tokenizer", "max_tokens", "seq_length", "keys"))
    cfg = {"a": 1, "logging": {"wandb": {"api_key": "abc", "project": "p"}},
           "list": [{"Token": "t"}, "https://u:pw@host/x"], "tokenizer": "byte"}
    assert scrub_secrets(cfg) == {"a": 1, "logging": {"wandb": {"api_key": "<redacted>", "project": "p"}},
                                  "list": [{"Token": "<redacted>"}, "https://<redacted>@host/x"], "tokenizer": "byte"}
    assert cfg["logging"]["wandb"]["api_key"] == "abc"  # a copy: the caller's config is untouched
    assert scrub_argv(["model=x", "logging.wandb.api_key=abc", "--hf-token", "abc", "--token=abc", "--seed", "1"]) == [
        "model=x", "logging.wandb.api_key=<redacted>", "--hf-token", "<redacted>", "--token=<redacted>", "--seed", "1"]


def test_invalid_mode_and_keys():
    with pytest.raises(ValueError, match=r"online.*offline.*disabled"):
        WandbSettings(mode="cloud")
    with pytest.raises(ValueError, match=r"online.*offline.*disabled"):
        MetricsLogger(False, {"mode": "on"})  # checked on every rank, not only the logging one
    with pytest.raises(ValueError, match="unknown logging.wandb keys"):
        WandbSettings.from_mapping({"mode": "offline", "api_key": "abc"})


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path / "runs"


def test_offline_run_holds_metrics_and_config_without_secrets(wandb_env, monkeypatch):
    secret = "abc-9f2e-never-logged"  # "abc" alone also occurs by chance in run ids and hex hashes
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "model=llama_tiny", f"logging.wandb.api_key={secret}"])
    run_config = compose([])
    config = {**to_plain_config(run_config),
              "logging": {"wandb": {"mode": "offline", "api_key": secret, "project": "megatron-lite-test"}},
              "data": {"cache_dir": "data_cache", "hf_token": secret, "url": f"https://me:{secret}@example.com/d"}}
    console = io.StringIO()
    settings = WandbSettings(mode="offline", project="megatron-lite-test", name="unit", tags=("test", "cpu"),
                             dir=str(wandb_env))
    with MetricsLogger(True, settings, config, total_steps=6, log_interval=2, stream=console) as logger:
        for step in range(1, 7):  # steps done, 1-based
            logger.log(step, {"train/loss": 6.0 - step, "train/lr": 1e-3 * step, "train/grad_norm": 0.5,
                              "perf/tokens_per_s": 1000.0 + step, "perf/mfu": 0.25,
                              **({"val/loss": 1.25} if step == 3 else {})})
        logger.summarize({"model/parameters": 1234})
        run_dir = logger.run_dir
    assert sys.argv[-1] == f"logging.wandb.api_key={secret}"  # restored after wandb.init

    lines = console.getvalue().splitlines()  # the first step, every 2nd, the last; validation on its own line
    assert [line.split("|")[0].split()[1] for line in lines] == ["1/6", "2/6", "3/6", "4/6", "6/6"]
    assert lines[2] == "step 3/6 | val loss 1.2500"
    assert lines[1] == "step 2/6 | loss 4.0000 | lr 2.0e-03 | gnorm 0.5 | tok/s 1,002 | MFU 25.0%"

    run = read_offline_run(run_dir)
    assert run["complete"] and run["name"] == "unit" and run["project"] == "megatron-lite-test"
    assert run["tags"] == ["test", "cpu"]
    assert [row["_step"] for row in run["history"]] == [1, 2, 3, 4, 5, 6]  # W&B gets every step
    assert [row["train/loss"] for row in run["history"]] == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert run["history"][2]["val/loss"] == 1.25 and run["summary"]["perf/tokens_per_s"] == 1006.0
    assert run["summary"]["model/parameters"] == 1234
    logged = run["config"]
    assert logged["trainer"] == to_plain_config(run_config)["trainer"] and logged["model"]["name"] == "llama_tiny"
    assert logged["logging"]["wandb"] == {"mode": "offline", "api_key": "<redacted>", "project": "megatron-lite-test"}
    assert logged["data"]["hf_token"] == "<redacted>" and logged["data"]["url"] == "https://<redacted>@example.com/d"

    files = [p for p in wandb_env.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files)
    leaking = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaking, f"secret written to {leaking}"


def test_non_logging_rank_and_disabled_mode_make_no_wandb_calls(wandb_env, monkeypatch):
    import wandb

    def forbidden(*args, **kwargs):
        raise AssertionError("wandb called")

    monkeypatch.setattr(wandb, "init", forbidden)
    monkeypatch.setattr(wandb, "log", forbidden)
    console = io.StringIO()
    for enabled, mode in ((False, "offline"), (False, "online"), (True, "disabled")):
        with MetricsLogger(enabled, WandbSettings(mode=mode, dir=str(wandb_env)), {"a": 1}, total_steps=3,
                           stream=console) as logger:
            for step in range(1, 4):
                logger.log(step, {"train/loss": 1.0})
            logger.message("hello")
            assert logger.run is None and logger.run_dir is None
    assert not wandb_env.exists()
    assert console.getvalue().count("hello") == 1  # only the enabled (disabled-W&B) logger prints
    assert console.getvalue().count("step") == 3


def test_format_metrics_skips_non_scalars():
    text = format_metrics({"train/loss": 2.5, "perf/tflops_per_rank": 0.01234, "comm": {"tp": 1}, "val/loss": 2.0,
                           "memory/host_rss_gib": 1.5, "perf/step_time_s": 0.25})
    assert text == "loss 2.5000 | TFLOP/s/rank 0.01234 | val/loss 2.0000 | memory/host_rss_gib 1.50GiB | time 250.0ms"


def test_progress_bar_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty, expect_bar in ((True, True), (False, False)):
        stderr, console = (Terminal() if tty else io.StringIO()), io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        with MetricsLogger(True, None, None, total_steps=3, log_interval=10, stream=console) as logger:
            for step in range(1, 4):
                logger.log(step, {"train/loss": 1.0, "perf/mfu": 0.5})
        assert ("3/3" in stderr.getvalue() and "MFU=50.00%" in stderr.getvalue()) == expect_bar
        assert console.getvalue().splitlines() == ["step 1/3 | loss 1.0000 | MFU 50.0%",
                                                   "step 3/3 | loss 1.0000 | MFU 50.0%"]


def test_console_line_has_a_fixed_short_field_set():
    base = {"train/loss": 2.34567, "train/lr": 3e-4, "train/grad_norm": 0.5123, "perf/tokens_per_s": 123456.7,
            "perf/mfu": 0.4123, "memory/host_rss_gib": 0.3123, "memory/host_peak_rss_gib": 0.5,
            "perf/step_time_s": 0.2, "train/tokens": 5000, "train/skipped_total": 0, "comm/tp/all_reduce_bytes": 9e6}
    line = console_line(7, 300, base)
    assert line == "step   7/300 | loss 2.3457 | lr 3.0e-04 | gnorm 0.512 | tok/s 123,457 | MFU 41.2% | rss 0.31G"
    cuda = {**base, "memory/cuda_max_allocated_gib": 12.345, "memory/cuda_max_reserved_gib": 14.0}
    assert console_line(7, 300, cuda).endswith("| MFU 41.2% | alloc 12.35G")
    fp16 = {**base, "train/loss_scale": 65536.0, "train/skipped_total": 12, "val/loss": 2.5, "val/perplexity": 12.18}
    line = console_line(300, 300, fp16)
    assert line.endswith("| rss 0.31G | scale 65536 | skipped 12") and len(line) <= 120, line
    assert validation_line(300, 300, fp16) == "step 300/300 | val loss 2.5000 | val ppl 12.18"
    assert validation_line(300, 300, base) is None
    assert console_line(1, 300, {"perf/tokens_per_s": 2.345e6}) == "step   1/300 | tok/s 2.35M"
    assert console_line(1, 300, {"train/loss": float("nan"), "train/grad_norm": None}) == "step   1/300 | loss nan"


def test_memory_metrics_are_named_for_the_device():
    cpu = memory_metrics("cpu")
    assert set(cpu) == {"host_rss_gib", "host_peak_rss_gib"}
    assert 10 * 2**20 / GIB < cpu["host_rss_gib"] <= cpu["host_peak_rss_gib"] + 1e-3
    assert cpu["host_peak_rss_gib"] == pytest.approx(host_peak_rss_bytes() / GIB, rel=0.1)
    assert memory_metrics(None).keys() == cpu.keys()
    if torch.cuda.is_available():
        gpu = memory_metrics("cuda:0")
        assert set(gpu) == {"cuda_max_allocated_gib", "cuda_max_reserved_gib"}
        assert gpu["cuda_max_allocated_gib"] <= gpu["cuda_max_reserved_gib"]


def test_describe_comm_takes_each_groups_largest_rank():
    first_stage = {"tp/all_reduce": 3 * 2**20, "pp/send": 96 * 2**10}
    last_stage = {"tp/all_reduce": 4 * 2**20, "pp/recv": 96 * 2**10, "pp/broadcast": 4}
    assert describe_comm([first_stage, last_stage]) == (
        "pp broadcast 4 B x1 | pp recv 96.0 KiB x1 | pp send 96.0 KiB x1 | tp all_reduce 4.0 MiB x2")
    assert describe_comm([{}]) == "none (one process)"
