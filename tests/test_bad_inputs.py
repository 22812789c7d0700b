"""Every bad config value and input is refused up front (issue 13): one ValueError naming the key, the
value and what is allowed, raised by the checks scripts/train.py runs before any rank or process group
starts; from the command line that is rc 2 and one `error:` line, fast, and nothing created."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megatron_lite.models.config import ModelConfig
from megatron_lite.training.config import compose
from megatron_lite.training.preflight import check_inputs, check_overrides, scrub_hydra_output
from megatron_lite.training.setup import check_run_config, resolve_data_parallel

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
BPE_VOCAB = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{tmp}: a regular file, an empty directory, indexed prefixes (only existence is checked up front),
    one prefix with its .bin but no .idx, a BPE tokenizer file and a file that is not a tokenizer."""
    from megatron_lite.data.tokenizer import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "adir").mkdir()
    for prefix in ("ds", "ds2", "val"):
        for ext in (".bin", ".idx"):
            (tmp / f"{prefix}{ext}").write_bytes(b"")
    (tmp / "half.bin").write_bytes(b"")
    words = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in "nrstlm"]
    tok = train_bpe_tokenizer([" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)], BPE_VOCAB,
                              tmp / "bpe.json")
    assert 257 < tok.vocab_size <= BPE_VOCAB
    return tmp


def run_checks(overrides: list[str]) -> None:
    """What scripts/train.py checks before it starts anything, in the same order, in-process."""
    check_overrides(overrides)
    cfg = compose(overrides)
    cfg = resolve_data_parallel(cfg, None)
    check_run_config(cfg, cfg.world_size)
    check_inputs(cfg)


def _overrides(case: str, tmp: Path) -> list[str]:
    overrides = case.format(tmp=tmp).split()
    if not any(o.startswith("data.cache_dir=") for o in overrides):  # never the checkout's data_cache
        overrides.append(f"data.cache_dir={tmp / 'cache'}")
    return overrides


IDX = "data=indexed data.validation_prefix={tmp}/val"
ONE = IDX + " data.train_prefixes=[{tmp}/ds]"
TWO = IDX + " data.train_prefixes=[{tmp}/ds,{tmp}/ds2]"
WANDB = "logging.wandb.mode=offline"

# (overrides, what the message must say): the key (with the value where it is the user's own text).
BAD = [
    ("optim.beta1=1.5", "optim.beta1=1.5"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1"),
    ("optim.beta2=1.0", "optim.beta2=1.0"),
    ("optim.eps=-1", "optim.eps=-1"),
    ("optim.eps=0", "optim.eps=0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3"),
    ("optim.bucket_size_mb=0", "optim.bucket_size_mb=0"),
    ("optim.bucket_size_mb=-1", "optim.bucket_size_mb=-1"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.min_lr=nan", "optim.min_lr"),
    ("optim.grad_clip=inf", "optim.grad_clip=inf"),
    ("trainer.peak_tflops=-1", "trainer.peak_tflops=-1"),
    ("trainer.peak_tflops=0", "trainer.peak_tflops=0"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps=0"),
    ("trainer.sample_tokens=-1", "trainer.sample_tokens=-1"),
    ("model.num_kv_heads=0", "model.num_kv_heads=0"),
    ("model.num_kv_heads=-2", "model.num_kv_heads=-2"),
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size=0"),
    ("model.init_std=-1", "model.init_std=-1"),
    ("model.norm_eps=-1", "model.norm_eps=-1"),
    ("model.rope_theta=0", "model.rope_theta=0"),
    ("model.vocab_pad_multiple=0", "model.vocab_pad_multiple=0"),
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("model.vocab_size=0", "model.vocab_size=0 must be >= 1"),
    ("model.max_seq_len=0", "model.max_seq_len=0"),
    ("seed=-1", "seed=-1"),
    (f"seed={2**32}", f"seed={2**32}"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0"),
    ("parallel.timeout_s=-5", "parallel.timeout_s=-5"),
    ("checkpoint.step=-1", "checkpoint.step=-1"),
    ("checkpoint.interval=-1", "checkpoint.interval=-1"),
    (ONE + " data.train_weights=[-1.0]", "data.train_weights[0]=-1.0"),
    (ONE + " data.train_weights=[0.0]", "data.train_weights=[0.0]"),
    (TWO + " data.train_weights=[1,-1]", "data.train_weights[1]=-1"),
    (TWO + " data.train_weights=[0,0]", "data.train_weights=[0.0, 0.0]"),
    ("data.validation_prefix={tmp}/val", "data.validation_prefix={tmp}/val"),
    ("data.train_prefixes=[{tmp}/ds]", "data.train_prefixes="),
    ("data.tokenizer_path={tmp}/bpe.json", "data.tokenizer_path={tmp}/bpe.json"),  # byte: the file is ignored
    ("model.vocab_size=200", "model.vocab_size=200 is smaller than the byte tokenizer's 257"),
    ("data.tokenizer=hf data.tokenizer_path={tmp}/bpe.json", "model.vocab_size=257 is smaller than the hf tokenizer"),
    ("data.tokenizer=hf data.tokenizer_path={tmp}/missing.json", "data.tokenizer_path={tmp}/missing.json does not"),
    ("data.tokenizer=hf data.tokenizer_path={tmp}/adir", "data.tokenizer_path={tmp}/adir is a directory"),
    ("data.tokenizer=hf data.tokenizer_path={tmp}/afile", "data.tokenizer_path={tmp}/afile cannot be used"),
    (IDX + " data.train_prefixes=[{tmp}/ds,{tmp}/nope]", "data.train_prefixes[1]={tmp}/nope: no {tmp}/nope.bin or"),
    (IDX + " data.train_prefixes=[{tmp}/half]", "data.train_prefixes[0]={tmp}/half: no {tmp}/half.idx;"),
    ("data=indexed data.train_prefixes=[{tmp}/ds] data.validation_prefix={tmp}/nope", "data.validation_prefix={tmp}/n"),
    ("data.cache_dir={tmp}/afile", "data.cache_dir={tmp}/afile is a file"),
    ("data.cache_dir={tmp}/afile/cache", "data.cache_dir={tmp}/afile/cache cannot be created"),
    ("checkpoint.dir={tmp}/afile", "checkpoint.dir={tmp}/afile is a file"),
    ("checkpoint.dir={tmp}/afile/ckpt", "checkpoint.dir={tmp}/afile/ckpt cannot be created: {tmp}/afile is a file"),
    ("checkpoint.resume_from={tmp}/missing", "checkpoint.resume_from={tmp}/missing does not exist"),
    ("checkpoint.resume_from={tmp}/afile", "checkpoint.resume_from={tmp}/afile is a file"),
    (WANDB + " logging.wandb.project=team/run", "logging.wandb.project='team/run' is not a valid W&B name"),
    ("logging=offline logging.wandb.project=" + "p" * 129, "logging.wandb.project='ppp"),
    (WANDB + " logging.wandb.entity=me:you", "logging.wandb.entity='me:you'"),
    (WANDB + " logging.wandb.project='a#b'", "logging.wandb.project='a#b'"),
    (WANDB + " logging.wandb.tags=[" + "t" * 65 + "]", "logging.wandb.tags[0]"),
    (WANDB + " logging.wandb.dir={tmp}/afile", "logging.wandb.dir={tmp}/afile is a file"),
    ("~trainer.max_steps", "deleting keys is not supported (~trainer.max_steps): set the value instead, e.g. "
                           "trainer.max_steps="),
    ("~optim.lr=0.003", "deleting keys is not supported (~optim.lr=0.003)"),
]

# Odd but valid: these must pass every check (and create nothing).
GOOD = [
    "optim.weight_decay=0",
    "optim.beta1=0 optim.beta2=0",
    "optim.warmup_steps=0",
    "optim.grad_clip=null",
    "trainer.peak_tflops=null",
    "trainer.peak_tflops=989",
    "model.num_kv_heads=null",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=null",
    "seed=0",
    f"seed={2**32 - 1}",
    "checkpoint.step=0",
    "checkpoint.dir=null",
    "checkpoint.dir=checkpoints",  # relative: inside the run's output directory, not checked here
    "checkpoint.dir={tmp}/new/deep/ckpt",
    "checkpoint.resume_from={tmp}/adir",
    "data.cache_dir={tmp}/fresh/cache",
    TWO + " data.train_weights=[0,1]",
    TWO + " data.train_weights=[0.7,0.3] data.cache_dir={tmp}/afile",  # indexed runs never use the cache dir
    "data.tokenizer=hf data.tokenizer_path={tmp}/bpe.json" + f" model.vocab_size={BPE_VOCAB}",
    "logging.wandb.project=team/run",  # disabled: W&B never sees it
    WANDB + " logging.wandb.project=my-proj_1.x logging.wandb.entity=lab logging.wandb.dir={tmp}/fresh/wandb",
]


@pytest.mark.parametrize("case,message", BAD, ids=[c for c, _ in BAD])
def test_bad_value_is_one_error_naming_the_key(files, case, message):
    with pytest.raises(ValueError) as err:
        run_checks(_overrides(case, files))
    text = str(err.value)
    assert message.format(tmp=files) in text
    assert "\n" not in text  # one line after "error: "


@pytest.mark.parametrize("case", GOOD)
def test_odd_but_valid_config_passes(files, case):
    before = sorted(p.name for p in files.iterdir())
    run_checks(_overrides(case, files))
    assert sorted(p.name for p in files.iterdir()) == before, "a check created something"


# The injected crash (megatron_lite/training/faults.py) lives in the environment, not the config:
# (environment, what the message must say; None: valid) for the default 1-rank job.
CRASH_ENV = [
    ({"MEGATRON_LITE_CRASH_RANK": "1"}, "MEGATRON_LITE_CRASH_RANK=1 is not a rank of this 1-rank job (0..0)"),
    ({"MEGATRON_LITE_CRASH_RANK": "-1"}, "MEGATRON_LITE_CRASH_RANK=-1"),
    ({"MEGATRON_LITE_CRASH_RANK": "five"}, "MEGATRON_LITE_CRASH_RANK='five'"),
    ({"MEGATRON_LITE_CRASH_RANK": "0", "MEGATRON_LITE_CRASH_AFTER_STEP": "0"}, "MEGATRON_LITE_CRASH_AFTER_STEP=0"),
    ({"MEGATRON_LITE_CRASH_RANK": "0", "MEGATRON_LITE_CRASH_AFTER_STEP": "2.5"},
     "MEGATRON_LITE_CRASH_AFTER_STEP='2.5'"),
    ({"MEGATRON_LITE_CRASH_RANK": "0", "MEGATRON_LITE_CRASH_AFTER_STEP": "1"}, None),
    ({"MEGATRON_LITE_CRASH_RANK": "0"}, None),
    ({"MEGATRON_LITE_CRASH_AFTER_STEP": "0"}, None),  # no crash asked for: the step is never read
]


@pytest.mark.parametrize("env,message", CRASH_ENV, ids=[" ".join(f"{k}={v}" for k, v in e.items())
                                                         for e, _ in CRASH_ENV])
def test_an_injected_crash_is_checked_up_front(files, monkeypatch, env, message):
    for key in ("MEGATRON_LITE_CRASH_RANK", "MEGATRON_LITE_CRASH_AFTER_STEP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if message is None:
        run_checks(_overrides("", files))
        return
    with pytest.raises(ValueError) as err:
        run_checks(_overrides("", files))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_num_kv_heads_null_means_as_many_as_heads_and_zero_is_refused():
    base = dict(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4)
    assert ModelConfig(**base).kv_heads == 4
    assert ModelConfig(**base, num_kv_heads=2).kv_heads == 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"model.num_kv_heads={bad} must be >= 1"):
            ModelConfig(**base, num_kv_heads=bad)


def test_scrub_hydra_output_masks_credentials_and_leaves_the_rest(tmp_path):
    scrub_hydra_output(str(tmp_path / "no" / "such" / "dir"))  # a missing directory is fine
    scrub_hydra_output(None)
    record = tmp_path / ".hydra"
    record.mkdir()
    url, masked_url = "https://alice:s3cret@data.example/tok.json", "https://<redacted>@data.example/tok.json"
    overrides = [f"data.tokenizer_path={url}", "+hf_token=tok123", "seed=3", "++env.WANDB_API_KEY=key456",
                 "optim.lr=0.001"]
    OmegaConf.save(OmegaConf.create({"seed": 3, "data": {"tokenizer_path": url, "train_weights": [0.5, 0.5]},
                                     "env": {"db_password": "pw789", "tokens_per_step": 4096},
                                     "interp": "${seed}", "eps": 1e-8}), record / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), record / "overrides.yaml")
    dirname = ",".join(overrides[1:])
    OmegaConf.save(OmegaConf.create({"hydra": {
        "run": {"dir": "outputs/${now:%H}"},
        "overrides": {"hydra": ["hydra.run.dir=out"], "task": overrides},
        "job": {"override_dirname": dirname, "config": {"override_dirname": {"kv_sep": "=", "item_sep": ","}}},
    }}), record / "hydra.yaml")
    untouched = tmp_path / "plain" / ".hydra"
    untouched.mkdir(parents=True)
    (untouched / "overrides.yaml").write_text("- seed=3\n")
    stamp = (untouched / "overrides.yaml").stat().st_mtime_ns

    scrub_hydra_output(str(tmp_path))
    scrub_hydra_output(str(tmp_path / "plain"))

    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        text = (record / name).read_text()
        for secret in ("s3cret", "tok123", "key456", "pw789"):
            assert secret not in text, (name, text)
    assert (untouched / "overrides.yaml").stat().st_mtime_ns == stamp  # nothing to mask: not rewritten
    assert sorted(p.name for p in record.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    config = OmegaConf.to_container(OmegaConf.load(record / "config.yaml"))
    assert config["data"] == {"tokenizer_path": masked_url, "train_weights": [0.5, 0.5]}
    assert config["env"] == {"db_password": "<redacted>", "tokens_per_step": 4096}
    assert (config["interp"], config["eps"], config["seed"]) == ("${seed}", 1e-8, 3)
    assert OmegaConf.to_container(OmegaConf.load(record / "overrides.yaml")) == [
        f"data.tokenizer_path={masked_url}", "+hf_token=<redacted>", "seed=3", "++env.WANDB_API_KEY=<redacted>",
        "optim.lr=0.001"]
    hydra = OmegaConf.to_container(OmegaConf.load(record / "hydra.yaml"))["hydra"]
    assert hydra["overrides"]["task"] == OmegaConf.to_container(OmegaConf.load(record / "overrides.yaml"))
    assert hydra["job"]["override_dirname"] == "+hf_token=<redacted>,seed=3,++env.WANDB_API_KEY=<redacted>," \
                                               "optim.lr=0.001"
    assert hydra["run"]["dir"] == "outputs/${now:%H}" and hydra["job"]["config"]["override_dirname"]["kv_sep"] == "="


# (overrides, what stderr's error line must say); {case}: this case's own folder.
CLI_BAD = [
    ("optim.beta1=1.5", "optim.beta1=1.5"),
    ("~trainer.max_steps", "deleting keys is not supported"),
    ("model.num_kv_heads=0", "model.num_kv_heads=0"),
    ("model.vocab_size=200", "model.vocab_size=200 is smaller"),
    ("seed=-1", "seed=-1"),
    ("data.cache_dir={afile}", "data.cache_dir="),
    ("checkpoint.dir={afile}/ckpt", "checkpoint.dir="),
    ("checkpoint.resume_from={case}/missing", "checkpoint.resume_from="),
    ("data=indexed data.train_prefixes=[{case}/nope] data.validation_prefix={case}/nope", "data.train_prefixes[0]"),
    ("data.validation_prefix={case}/val", "data.validation_prefix="),
    ("logging.wandb.mode=offline logging.wandb.project=a/b", "logging.wandb.project="),
    ("MEGATRON_LITE_CRASH_RANK=0 MEGATRON_LITE_CRASH_AFTER_STEP=0", "MEGATRON_LITE_CRASH_AFTER_STEP=0"),
]


def _concurrency() -> int:
    return max(2, min(8, (os.cpu_count() or 2)))


def test_the_script_refuses_bad_inputs_fast_with_one_error_line(tmp_path):
    """Real launches: rc != 0, exactly one `error:` line, no traceback, under 10 s each, and no
    checkpoint or cache directory made. Run a few at a time (as many as there are cores, up to 8)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "WANDB_", "HYDRA_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGATRON_LITE_"))}
    pending = list(enumerate(CLI_BAD))
    results = {}
    while pending:
        batch, pending = pending[:_concurrency()], pending[_concurrency():]
        running = {}
        for i, (case, _) in batch:
            case_dir = tmp_path / f"case{i}"
            case_dir.mkdir()
            words = case.format(case=case_dir, afile=afile).split()
            case_env = dict(w.split("=", 1) for w in words if w.startswith("MEGATRON_LITE_"))  # the environment's
            overrides = [w for w in words if not w.startswith("MEGATRON_LITE_")]
            defaults = {"data.cache_dir": case_dir / "cache", "checkpoint.dir": case_dir / "ckpt",
                        "hydra.run.dir": case_dir / "out"}
            overrides += [f"{k}={v}" for k, v in defaults.items() if not any(o.startswith(k + "=") for o in overrides)]
            out, err = open(case_dir / "stdout", "w"), open(case_dir / "stderr", "w")
            proc = subprocess.Popen([sys.executable, TRAIN, *overrides], cwd=case_dir, env={**env, **case_env},
                                    stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)
            running[i] = (proc, time.monotonic(), out, err)
        deadline = time.monotonic() + 60
        while running:
            for i, (proc, start, out, err) in list(running.items()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    if proc.returncode is None:
                        proc.kill()
                        proc.wait()
                    results[i] = (proc.returncode, time.monotonic() - start)
                    out.close()
                    err.close()
                    del running[i]
            time.sleep(0.02)

    print("wall s per launch:", {CLI_BAD[i][0]: round(wall, 1) for i, (_, wall) in sorted(results.items())})
    failures = []
    for i, (case, message) in enumerate(CLI_BAD):
        case_dir = tmp_path / f"case{i}"
        rc, wall = results[i]
        stdout, stderr = (case_dir / "stdout").read_text(), (case_dir / "stderr").read_text()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        problems = []
        if rc == 0 or rc is None:
            problems.append(f"rc={rc}")
        if len(errors) != 1 or message not in errors[0]:
            problems.append(f"error lines {errors}")
        if "Traceback" in stdout + stderr:
            problems.append("a traceback")
        if wall >= 10:
            problems.append(f"took {wall:.1f} s")
        made = [p.name for p in (case_dir / "cache", case_dir / "ckpt", case_dir / "missing") if p.exists()]
        if made or not afile.is_file():
            problems.append(f"created {made}")
        if problems:
            failures.append(f"{case}: {'; '.join(problems)}\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
