"""The training script end to end: bad configs fail fast with one clear message, a 3D run learns."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.layers.embedding import padded_vocab_size
from megatron_lite.models.transformer import build_model
from megatron_lite.parallel.layout import ParallelLayout
from megatron_lite.parallel.spawn import run_on_ranks
from megatron_lite.training.config import compose
from megatron_lite.training.logging import read_offline_run
from megatron_lite.training.resume import ResumePlan
from megatron_lite.training.sample import generation_chunks
from megatron_lite.training.trainer import _final_checkpoint
from megatron_lite.training.setup import check_run_config, resolve_data_parallel

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, *overrides, timeout=240):
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), f"data.cache_dir={tmp_path / 'data'}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'out'}", *overrides]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


# (override, message): Hydra rejects unknown keys and wrong types while composing; the rest is ours.
BAD_CONFIGS = [
    ("parallel.tpp=2", "Could not override 'parallel.tpp'"),
    ("parallel.tp=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ("model=gpt5", "Could not find 'model/gpt5'"),
    ("parallel.dp=null", "parallel.dp=null needs a launcher"),
    ("parallel.tp=3", "model.num_heads=4 is not divisible by parallel.tp=3"),
    ("parallel.schedule=zigzag", "parallel.schedule='zigzag' is not allowed; choose one of ['gpipe', '1f1b', "
                                 "'interleaved_1f1b', 'zb_h1', 'zb_h2', 'zbv']"),
    ("parallel.pp=2 parallel.schedule=zbv", "zbv runs two model chunks per rank in a V, got virtual_stages=1; "
                                            "use virtual_stages=2"),
    ("parallel.pp=4 parallel.schedule=zbv parallel.virtual_stages=2", "num_layers=4 cannot be split into "
                                                                     "pp*virtual_stages=4*2=8 equal chunks"),
    ("parallel.pp=2 parallel.schedule=interleaved_1f1b parallel.virtual_stages=2 trainer.global_batch_size=12",
     "multiple of pp=2, got 3"),
    ("parallel.dp=3", "trainer.global_batch_size=16 is not divisible by trainer.micro_batch_size x parallel.dp = "
                      "4 x 3 = 12: choose a multiple of 12"),
    ("parallel.pp=2 parallel.layers_per_stage=[1,2]", "parallel.layers_per_stage=[1, 2] must list 2 positive counts"),
    ("parallel.device=gpu", "parallel.device='gpu' is not allowed; choose one of ['auto', 'cpu', 'cuda']"),
    ("parallel.pp=8", "model.num_layers=4 is smaller than parallel.pp=8"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed; choose one of ['fp32', 'bf16', 'fp16']"),
    ("trainer.recompute=some", "trainer.recompute='some' is not allowed"),
    ("logging.wandb.mode=cloud", "logging.wandb.mode='cloud' is not allowed; choose one of ['online', 'offline', 'disabled']"),
    ("trainer.seq_length=1000", "trainer.seq_length=1000 exceeds model.max_seq_len=256"),
    ("trainer.sample_tokens=256", "trainer.sample_tokens=256 must be below model.max_seq_len=256"),
    ("parallel.tp=4 parallel.sequence_parallel=true trainer.seq_length=126", "divisible by parallel.tp=4"),
    ("optim.backend=deepspeed parallel.pp=2", "optim.backend=deepspeed supports pp=1 only"),
    ("optim.backend=deepspeed", "optim.backend=deepspeed does not write checkpoints yet"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be a positive integer"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be > 0"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS, ids=[o for o, _ in BAD_CONFIGS])
def test_bad_configs_are_one_clear_error(override, message):
    """The same composition and checks scripts/train.py runs, in-process (Hydra compose API)."""
    with pytest.raises(ValueError) as err:
        cfg = compose(override.split())
        check_run_config(resolve_data_parallel(cfg, None), cfg.world_size)
    assert message in str(err.value)


@pytest.mark.parametrize("override,message", [BAD_CONFIGS[0], BAD_CONFIGS[4]], ids=["hydra", "ours"])
def test_script_exits_with_the_message_before_starting_processes(tmp_path, override, message):
    result = run_train(tmp_path, *override.split(), timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "data").exists()


def test_compose_gives_typed_config():
    cfg = compose(["parallel.tp=2", "optim.lr=1e-3", "trainer.max_steps=7", "model=llama3_8b"])
    assert (cfg.parallel.tp, cfg.optim.lr, cfg.trainer.max_steps) == (2, 1e-3, 7)
    model = cfg.model_config()  # llama3_8b inherits the LLaMA architecture from llama_tiny's file
    assert (model.hidden_size, model.num_kv_heads, model.norm, model.rope_theta) == (4096, 8, "rmsnorm", 500000.0)


@pytest.mark.parametrize("name", ["gpt2_tiny", "llama_tiny", "gpt2_124m", "llama2_7b", "llama2_70b", "llama3_8b",
                                  "llama3_70b", "llama3_405b"])
def test_every_model_config_composes(name):
    assert compose([f"model={name}"]).model.name == name


def _sample(stdout: str) -> str:
    marker = "sample from the model after training:\n"
    assert marker in stdout, stdout[-2000:]
    return stdout.split(marker, 1)[1].rstrip("\n")


def test_end_of_run_sample_is_the_same_text_under_every_layout(tmp_path):
    """The trainer's sample comes from the inference engine on the trained weights: serial, and TP2 x PP2
    with sequence parallelism (the stage rebuilt without it) and two chunks per rank (regrouped through
    the final checkpoint), print the same text."""
    short = ["trainer.max_steps=2", "trainer.seq_length=64", "trainer.eval_interval=100", "trainer.sample_tokens=24",
             "model.num_layers=4"]
    for name in ("serial", "3d"):
        (tmp_path / name).mkdir()
    serial = run_train(tmp_path / "serial", *short)
    assert serial.returncode == 0, serial.stderr[-3000:]
    parallel = run_train(tmp_path / "3d", *short, "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                         "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert len(_sample(serial.stdout)) > 0
    assert _sample(parallel.stdout) == _sample(serial.stdout)


def test_the_sample_regroups_from_the_checkpoint_that_holds_the_final_weights():
    cfg, plan = compose([]), ResumePlan("run", save_dir="/ckpt", load_dir="/other", load_step=7, source="resume_from")
    assert _final_checkpoint(cfg, plan, {"last_step": 9, "saved_step": 9}) == ("/ckpt", 9)
    assert _final_checkpoint(cfg, plan, {}) == ("/other", 7)  # resumed with nothing left to train
    # The final save was refused (a skipped last step, non-finite weights): no older step stands in for it.
    assert _final_checkpoint(cfg, plan, {"last_step": 9}) == "the final checkpoint was not written"
    assert _final_checkpoint(compose(["checkpoint.dir=null"]), ResumePlan("run"), {"last_step": 9}) == \
        "checkpoint.dir is null"


def test_no_sample_when_chunks_cannot_be_regrouped():
    for why in ("checkpoint.dir is null", "the final checkpoint was not written"):
        chunks, reason = generation_chunks(compose([]), ["chunk 0", "chunk 1"], ParallelLayout.serial(), why)
        assert chunks is None
        assert reason == f"2 model chunks per rank are regrouped into one through the final checkpoint, and {why}"


CONSOLE_LINE = re.compile(r"^step +(\d+)/12 \| loss (\d+\.\d{4}) \| lr \d\.\de-\d\d \| gnorm \S+ \| tok/s [\d,]+ \| "
                          r"MFU \d+\.\d% \| rss \d+\.\d\dG$")


def test_3d_training_run_learns_and_logs_offline(tmp_path):
    """The 8-rank 3D demo: a short console line with fixed fields every log_interval steps, W&B with
    every step, the tokens consumed and the whole model's parameter count."""
    result = run_train(tmp_path, "parallel=3d_cpu", "trainer.max_steps=12", "trainer.seq_length=64",
                       "trainer.eval_interval=6", "trainer.log_interval=5", "trainer.sample_tokens=20",
                       "trainer.peak_tflops=0.1", "logging=offline", "checkpoint.dir=null")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert all(len(line) <= 120 for line in lines if not line.startswith(("communication", "  node"))), lines
    train_lines = [line for line in steps if "| loss " in line]
    assert [int(CONSOLE_LINE.match(line).group(1)) for line in train_lines] == [1, 5, 10, 12], steps
    val = [float(line.split("| val loss ")[1].split(" |")[0]) for line in steps if "| val loss " in line]
    assert len(val) == 2 and val[1] < val[0]
    startup = "\n".join(lines[:3])
    assert "device cpu, backend gloo, world 8 | layout tp=2 pp=2 dp=2 | 1f1b, 2 microbatches" in startup, startup
    # The serial model's count, with the vocabulary rows TP=2 pads on (to a multiple of tp x vocab_pad_multiple).
    model_cfg = compose([]).model_config()
    rows = [padded_vocab_size(model_cfg.vocab_size, tp, model_cfg.vocab_pad_multiple) for tp in (1, 2)]
    serial = sum(p.numel() + (rows[1] - rows[0]) * p.shape[-1] * (p.dim() == 2 and p.shape[0] == rows[0])
                 for p in build_model(model_cfg, ParallelLayout.serial(), 0).parameters())
    assert f"model llama_tiny: {serial:,} parameters | global batch 16 x 64 tokens" in startup, startup
    comm = next(line for line in lines if line.startswith("communication per step"))
    assert all(group in comm for group in ("tp all_reduce", "pp send", "pp recv", "dp all_reduce")), comm
    assert "sample from the model after training" in result.stdout
    assert "every tp group is within one node" in result.stdout  # 8 local ranks: one node

    run = read_offline_run(next((tmp_path / "out" / "wandb").glob("offline-run-*")))
    history = run["history"]
    assert [row["_step"] for row in history] == list(range(1, 13))  # every step, not only the console's
    losses = [row["train/loss"] for row in history]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(257) = 5.5 towards the byte entropy of English
    assert [f"{history[s - 1]['train/loss']:.4f}" for s in (1, 5, 10, 12)] == [
        CONSOLE_LINE.match(line).group(2) for line in train_lines]
    assert [row["train/tokens"] for row in history] == [16 * 64 * s for s in range(1, 13)]
    assert [row["train/samples"] for row in history] == [16 * s for s in range(1, 13)]
    assert run["summary"]["model/parameters"] == serial
    assert run["summary"]["comm/tp/all_reduce_bytes"] > 0
    assert {"stage0/host_rss_gib", "stage1/host_rss_gib", "stage0/step_time_s", "memory/host_rss_gib",
            "train/skipped_total", "perf/mfu"} <= set(history[4]), sorted(history[4])
    assert "train/loss_scale" not in history[0]  # fp32


def test_fp16_run_logs_its_loss_scale(tmp_path):
    result = run_train(tmp_path, "trainer.precision=fp16", "trainer.max_steps=3", "trainer.seq_length=32",
                       "trainer.global_batch_size=4", "trainer.eval_interval=100", "trainer.sample_tokens=0",
                       "logging=offline", "checkpoint.dir=null")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^step 1/3 \| .* \| scale 65536$", result.stdout, re.M), result.stdout
    history = read_offline_run(next((tmp_path / "out" / "wandb").glob("offline-run-*")))["history"]
    assert [row["train/loss_scale"] for row in history] == [65536.0] * 3


def _losses_on_ranks(rank, world, overrides):
    from megatron_lite.training.trainer import train

    return train(compose(overrides))["train_loss"]


def test_the_global_batch_and_the_losses_do_not_change_with_dp(tmp_path):
    """trainer.global_batch_size=16 with micro batches of 2: dp=1 runs 8 microbatches, dp=2 four, dp=4 two;
    each step sees the same 16 sequences, so the losses agree with the one-process run."""
    common = [f"data.cache_dir={tmp_path / 'data'}", "checkpoint.dir=null", "trainer.max_steps=4",
              "trainer.seq_length=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=16",
              "trainer.eval_interval=100", "trainer.sample_tokens=0", "optim.warmup_steps=1"]
    losses = {dp: run_on_ranks(_losses_on_ranks, dp, [*common, f"parallel.dp={dp}"], timeout_s=180)[0]
              for dp in (1, 2, 4)}
    assert compose([*common, "parallel.dp=4"]).microbatches == 2
    for dp in (2, 4):
        assert losses[dp] == pytest.approx(losses[1], rel=1e-5), (dp, losses[dp], losses[1])
    assert losses[1][-1] < losses[1][0]


def test_training_on_a_blend_of_preprocessed_corpora(tmp_path):
    import json

    from megatron_lite.data.preprocess import preprocess
    from megatron_lite.data.tokenizer import ByteTokenizer

    prefixes = {}
    for name, text in (("verse", "shall I compare thee to a summer's day " * 60),
                       ("prose", "it was the best of times, it was the worst of times " * 60)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"text": text[i:i + 500]}) for i in range(0, len(text), 500)))
        prefixes[name] = str(tmp_path / name)
        preprocess(str(path), prefixes[name], ByteTokenizer(), cache_dir=str(tmp_path / "hf"))
    blend = ("data=indexed", f"data.train_prefixes=[{prefixes['verse']},{prefixes['prose']}]",
             "data.train_weights=[0.7,0.3]", f"data.validation_prefix={prefixes['prose']}")
    result = run_train(tmp_path, *blend, "trainer.max_steps=6", "trainer.seq_length=32", "trainer.eval_interval=3",
                       "trainer.sample_tokens=0", "checkpoint.dir=null", "trainer.log_interval=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| loss ") == 6

    missing = run_train(tmp_path, "data=indexed", f"data.train_prefixes=[{tmp_path / 'nope'}]",
                        f"data.validation_prefix={prefixes['prose']}", "trainer.max_steps=1", "checkpoint.dir=null")
    assert missing.returncode != 0 and str(tmp_path / "nope") in missing.stderr


@pytest.mark.matrix  # the backend's equivalence is tests/test_deepspeed_backend.py's; this is its config path
def test_deepspeed_backend_from_the_config_trains_like_the_native_optimizer(tmp_path):
    common = ("parallel.tp=2", "parallel.dp=2", "checkpoint.dir=null", "trainer.max_steps=3", "trainer.log_interval=1",
              "trainer.eval_interval=100", "trainer.sample_tokens=0", "trainer.seq_length=32")
    runs = [run_train(tmp_path, *common, *backend) for backend in
            ((), ("optim.backend=deepspeed", "optim.deepspeed_zero_stage=2"))]
    losses = []
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append([line.split("| loss ")[1].split(" |")[0] for line in result.stdout.splitlines() if "| loss " in line])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
