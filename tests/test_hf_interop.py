"""Hugging Face interop against `transformers` itself: models built locally from configs (random
weights, save_pretrained into a temp dir, nothing downloaded), imported under TP x PP x DP layouts,
compared by logits with LlamaForCausalLM / GPT2LMHeadModel and exported back byte for byte."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megatron_lite.interop import HFCheckpointError, UnsupportedModel, check_hf_directory, load_hf_weights  # noqa: E402
from megatron_lite.interop import export_checkpoint, export_chunks, model_config_from_hf  # noqa: E402
from megatron_lite.interop import families, load  # noqa: E402
from megatron_lite.interop.families import Rule  # noqa: E402
from megatron_lite.interop.mapping import Mapping  # noqa: E402
from megatron_lite.models.partition import build_model_chunks  # noqa: E402
from megatron_lite.models.transformer import build_model  # noqa: E402
from megatron_lite.parallel import comm  # noqa: E402
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes  # noqa: E402
from megatron_lite.parallel.spawn import run_on_ranks  # noqa: E402
from megatron_lite.pipeline.executor import PipelineExecutor  # noqa: E402
from megatron_lite.pipeline.schedules import build_schedule  # noqa: E402
from megatron_lite.training.config import compose  # noqa: E402

VOCAB = 251  # odd: padded under every TP size (and to a multiple of 8 below)
SEQ = 96
PAD_MULTIPLE = 8
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _save(model, path, dtype=torch.float32, max_shard_size=None):
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return str(path)


def llama(path, *, tied=False, heads=8, kv_heads=2, dtype=torch.float32, rope=None, max_shard_size=None, hidden=64,
          layers=2, vocab=VOCAB, ffn=96):
    torch.manual_seed(len(str(path)))
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      tie_word_embeddings=tied, max_position_embeddings=128,
                                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
                                      bos_token_id=1, eos_token_id=2)
    return _save(transformers.LlamaForCausalLM(config), path, dtype, max_shard_size)


def gpt2(path, dtype=torch.float32):
    torch.manual_seed(7)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return _save(transformers.GPT2LMHeadModel(config), path, dtype)


def mixtral(path, dtype=torch.float32, max_shard_size=None, experts=4, vocab=VOCAB):
    torch.manual_seed(11)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                        num_key_value_heads=2, vocab_size=vocab, num_local_experts=experts,
                                        num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=1,
                                        eos_token_id=2)
    return _save(transformers.MixtralForCausalLM(config), path, dtype, max_shard_size)


VARIANTS = {  # name -> builder(path); together: GQA 4:1, tied and untied, llama3 rope, fp32 and bf16, a shard index
    "llama_gqa_untied_sharded": lambda p: llama(p, max_shard_size="60KB"),
    "llama_tied_llama3_rope_bf16": lambda p: llama(p, tied=True, dtype=torch.bfloat16, rope=LLAMA3_ROPE),
    "gpt2": gpt2,
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(root / name) for name, build in VARIANTS.items()}


def reference_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens_for_test() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def full_logits(chunks, layout, tokens):
    """Logits of the whole vocabulary (padding columns included) on the last stage's first TP/DP rank."""
    plan = build_schedule("1f1b", layout.pp.size, layout.pp.size)
    shape = chunks[0].activation_shape(tokens.shape[0], tokens.shape[1])
    executor = PipelineExecutor(plan, chunks, layout, shape, chunks[0].dtype)
    with torch.no_grad():
        executor.run([tokens] * plan.num_microbatches, None, forward_only=True)
    if 0 not in executor.outputs:
        return None
    logits = comm.all_gather(executor.outputs[0].contiguous(), layout.tp, dim=-1)
    return logits if layout.tp.rank == 0 and layout.dp.rank == 0 else None


def import_export_worker(rank, world, tp, pp, dp, dirs: dict, out_root: str, ep: int = 1):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp, dp=dp, ep=ep))
    results = {}
    for name, path in dirs.items():
        cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json")))).with_(vocab_pad_multiple=PAD_MULTIPLE)
        chunks = build_model_chunks(cfg, layout, seed=0, initialize=False)
        stats = load_hf_weights(chunks, path, cfg)
        logits = full_logits(chunks, layout, tokens_for_test())
        exported = export_chunks(chunks, layout, os.path.join(out_root, name), cfg, template=path)
        results[name] = {"logits": logits, "exported": exported, **stats}
    return results


def _tensors(path: str) -> dict:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({key: (name, f.get_tensor(key)) for key in f.keys()})
    return out


def assert_same_files(original: str, exported: str):
    a, b = _tensors(original), _tensors(exported)
    assert sorted(a) == sorted(b)
    for key, (file_a, tensor_a) in a.items():
        file_b, tensor_b = b[key]
        assert file_a == file_b, key  # the same shard index
        assert tensor_a.dtype == tensor_b.dtype and torch.equal(tensor_a, tensor_b), key
    if os.path.exists(os.path.join(original, "model.safetensors.index.json")):
        index = [json.load(open(os.path.join(d, "model.safetensors.index.json"))) for d in (original, exported)]
        assert index[0]["weight_map"] == index[1]["weight_map"]
        assert index[0]["metadata"]["total_size"] == index[1]["metadata"]["total_size"]


def max_relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)],
                         ids=["serial", "tp2", "pp2", "tp2xpp2", "dp2"])
def test_import_matches_transformers_and_export_gives_the_files_back(hf_dirs, tmp_path, tp, pp, dp):
    world = tp * pp * dp
    results = run_on_ranks(import_export_worker, world, tp, pp, dp, hf_dirs, str(tmp_path), timeout_s=240)
    tokens = tokens_for_test()
    for name, path in hf_dirs.items():
        logits = next(r[name]["logits"] for r in results if r[name]["logits"] is not None)
        reference = reference_logits(path, tokens)
        assert torch.isneginf(logits[..., VOCAB:]).all(), "padding columns must be -inf"
        assert max_relative(logits[..., :VOCAB], reference) < 1e-5, name
        exported = results[0][name]["exported"]
        assert_same_files(path, exported)
        _, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert not any(n.endswith(".parts") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("tp,pp,dp,ep", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 1, 2, 2), (1, 2, 2, 2)],
                         ids=["serial", "tp2", "dp2xep2", "pp2xdp2xep2"])
def test_mixtral_imports_under_expert_parallelism_and_exports_the_same_files(tmp_path, tp, pp, dp, ep):
    """A MixtralForCausalLM (4 experts, top-2, bf16, a shard index) with its experts cut over EP: logits
    equal transformers' and the export gives back every per-expert tensor bitwise."""
    path = mixtral(tmp_path / "mixtral", dtype=torch.bfloat16, max_shard_size="150KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.normalize_topk, cfg.expert_ffn_size) == (4, 2, True, 96)
    results = run_on_ranks(import_export_worker, tp * pp * dp, tp, pp, dp, {"mixtral": path}, str(tmp_path / "out"),
                           ep, timeout_s=240)
    logits = next(r["mixtral"]["logits"] for r in results if r["mixtral"]["logits"] is not None)
    assert max_relative(logits[..., :VOCAB], reference_logits(path, tokens_for_test())) < 1e-5
    exported = results[0]["mixtral"]["exported"]
    assert_same_files(path, exported)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    sizes = {k: t.numel() * t.element_size() for k, (_, t) in _tensors(path).items()}
    expert_bytes = sum(n for k, n in sizes.items() if ".experts." in k)
    if ep == 2 and tp == pp == 1:  # each EP rank reads half of the experts and all of the rest, exactly
        assert all(r["mixtral"]["bytes_read"] == sum(sizes.values()) - expert_bytes // 2 for r in results)


def test_mixtral_experts_in_the_wrong_order_fail_the_logit_check(tmp_path):
    """Negative control: w1 and w3 (gate and up) swapped in the table move the logits by a wide margin."""
    path = mixtral(tmp_path / "mixtral")
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))

    def swapped_rules(c):
        swap = {"experts.gate_proj": "experts.up_proj", "experts.up_proj": "experts.gate_proj"}
        return [replace(r, ours=tuple(next((n.replace(a, b) for a, b in swap.items() if n.endswith(a)), n)
                                      for n in r.ours)) for r in families.MIXTRAL.rules(c)]

    tokens = tokens_for_test()
    reference = reference_logits(path, tokens)
    assert max_relative(_serial_logits(path, Mapping(cfg), tokens), reference) < 1e-5
    swapped = Mapping(cfg, replace(families.MIXTRAL, rules=swapped_rules))
    assert max_relative(_serial_logits(path, swapped, tokens), reference) > 1e-2


def test_moe_models_mixtral_cannot_hold_are_refused_for_export():
    cfg = compose(["model=moe_tiny"]).model_config()
    assert Mapping(cfg).family.name == "mixtral"
    for change, message in (({"num_shared_experts": 1}, "num_shared_experts=1"),
                            ({"layer_freq": 2}, r"MoE layers \[1, 3\]"),
                            ({"bias_update_rate": 0.001}, "routing bias"),
                            ({"normalize_topk": False}, "without normalize_topk"),
                            ({"capacity_factor": 1.25}, "token dropping")):
        with pytest.raises(UnsupportedModel, match=message):
            Mapping(cfg.with_(moe=replace(cfg.moe, **change)))


def test_llama3_rope_scaling_matters_beyond_the_original_context(hf_dirs):
    """The scaled model's logits past original_max_position_embeddings (32) differ from plain RoPE's by a
    wide margin, so the 1e-5 agreement above is the scaling computed right, not scaling unused."""
    path = hf_dirs["llama_tied_llama3_rope_bf16"]
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    tokens = tokens_for_test()
    reference = reference_logits(path, tokens)
    for scaling, expect_close in ((cfg.rope_scaling, True), (None, False)):
        model = build_model(cfg.with_(rope_scaling=scaling), ParallelLayout.serial(), seed=0, initialize=False)
        load_hf_weights([model], path, cfg.with_(rope_scaling=scaling))
        with torch.no_grad():
            logits = model(tokens)
        assert (max_relative(logits, reference) < 1e-5) == expect_close
        if not expect_close:  # positions inside the original context are unaffected by the scaling of long wavelengths
            assert max_relative(logits[:, 40:], reference[:, 40:]) > 1e-3


def _serial_logits(path: str, mapping: Mapping, tokens) -> torch.Tensor:
    cfg = mapping.cfg
    model = build_model(cfg, ParallelLayout.serial(), seed=0, initialize=False)
    from megatron_lite.interop.hf_dir import HFDirectory, SliceReader

    reader = SliceReader(HFDirectory(path))
    with torch.no_grad():
        for name, param in model.named_parameters():
            region, padding = load.local_region(param.shard_spec)
            for piece in mapping.pieces(name, region):
                piece.target(param).copy_(reader.read(piece.hf, piece.hf_region))
        return model(tokens)


def test_negative_controls_fail_by_a_wide_margin(tmp_path):
    """The logit check can fail: q and k swapped in the table, a checkpoint whose q/k rows are in Meta's
    interleaved RoPE layout loaded without the permutation, and a wrong TP split dimension (below)."""
    path = llama(tmp_path / "mha", heads=4, kv_heads=4)
    tokens = tokens_for_test()
    reference = reference_logits(path, tokens)
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    right = Mapping(cfg)
    assert max_relative(_serial_logits(path, right, tokens), reference) < 1e-5

    def swapped_rules(c):
        rules = []
        for rule in families.LLAMA.rules(c):
            name = rule.ours[0]
            if ".attention.q_proj" in name or ".attention.k_proj" in name:
                other = name.replace("q_proj", "@").replace("k_proj", "q_proj").replace("@", "k_proj")
                rule = Rule(rule.hf, (other,), rule.transpose)
            rules.append(rule)
        return rules

    swapped = Mapping(cfg, replace(families.LLAMA, rules=swapped_rules))
    assert max_relative(_serial_logits(path, swapped, tokens), reference) > 1e-2

    # Meta's layout: q/k rows of each head interleaved (pairs (0, 1), (2, 3), ...), not rotate-half.
    meta = tmp_path / "meta_layout"
    meta.mkdir()
    tensors = {k: t for k, (_, t) in _tensors(path).items()}
    head_dim = cfg.head_dim
    for key in [k for k in tensors if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        w = tensors[key]
        heads = w.shape[0] // head_dim
        tensors[key] = w.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()
    save_file(tensors, str(meta / "model.safetensors"), metadata={"format": "pt"})
    (meta / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    assert max_relative(_serial_logits(str(meta), right, tokens), reference) > 1e-2


def wrong_split_worker(rank, world, path):
    """TP2 with the row-parallel weights (o_proj, down_proj: cut along dim 1) read as rows of dim 0 instead,
    reshaped to the local shape: what a table with the wrong split dimension would load."""
    from megatron_lite.interop.hf_dir import HFDirectory, SliceReader

    layout = ParallelLayout.from_mesh(ParallelSizes(tp=2))
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    chunks = build_model_chunks(cfg, layout, seed=0, initialize=False)
    load_hf_weights(chunks, path, cfg)
    mapping, reader = Mapping(cfg), SliceReader(HFDirectory(path))
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            spec = param.shard_spec
            if spec.dim == 1:
                rows = spec.full_shape[0] // 2
                region = [(layout.tp.rank * rows, (layout.tp.rank + 1) * rows), (0, spec.full_shape[1])]
                [piece] = mapping.pieces(name, region)
                param.copy_(reader.read(piece.hf, piece.hf_region).reshape(param.shape))
    return full_logits(chunks, layout, tokens_for_test())


def test_a_wrong_split_dimension_fails_the_logit_check(tmp_path):
    path = llama(tmp_path / "mha", heads=4, kv_heads=4)
    logits = run_on_ranks(wrong_split_worker, 2, path, timeout_s=120)[0]
    assert max_relative(logits[..., :VOCAB], reference_logits(path, tokens_for_test())) > 1e-2


def bytes_worker(rank, world, tp, pp, path):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp))
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    before = _rss_bytes()
    chunks = build_model_chunks(cfg, layout, seed=0, initialize=False)
    stats = load_hf_weights(chunks, path, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**stats, "peak_growth": peak - before}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_each_rank_reads_its_share_of_the_file_and_never_holds_the_whole_model(tmp_path):
    """~100M parameters (400 MB fp32), untied so that both pipeline stages hold as much: at TP2 x PP2
    every rank reads a quarter of the bytes, and its resident memory grows by far less than the model."""
    path = llama(tmp_path / "big", hidden=1024, heads=8, kv_heads=4, layers=8, ffn=2816, vocab=8192)
    file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    results = run_on_ranks(bytes_worker, 4, 2, 2, path, timeout_s=240)
    for rank, r in enumerate(results):
        share = r["bytes_read"] / r["file_bytes"]
        assert 0.22 < share < 0.28, (rank, share)
        assert r["peak_growth"] < 0.6 * file_bytes, (rank, r["peak_growth"] / 2**20, file_bytes / 2**20)
    serial = run_on_ranks(bytes_worker, 1, 1, 1, path, timeout_s=240)[0]
    assert serial["bytes_read"] / serial["file_bytes"] > 0.99  # the count sees a whole read


def zero_checkpoint_worker(rank, world, path, root, live_out, sizes):
    """Import with ZeRO-1 (TP2 x DP2, or DP2 x EP2), train two steps, save a DCP checkpoint and export live."""
    from megatron_lite.checkpoint.checkpoint import save_checkpoint
    from megatron_lite.optim import OptimizerConfig, build_optimizer
    from megatron_lite.training.step import train_step

    layout = ParallelLayout.from_mesh(sizes)
    cfg = model_config_from_hf(json.load(open(os.path.join(path, "config.json"))))
    chunks = build_model_chunks(cfg, layout, seed=0, initialize=False)
    load_hf_weights(chunks, path, cfg)
    optimizer = build_optimizer(chunks, layout, OptimizerConfig(lr=1e-2, zero1=True))
    plan = build_schedule("1f1b", 1, 2)
    batch = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(3))
    local = batch.chunk(2)[layout.dp.rank]
    for _ in range(2):
        train_step(chunks, optimizer, local[:, :-1], local[:, 1:], layout, plan)
    model_section = {"name": "hf", "path": path, **asdict(cfg)}
    save_checkpoint(root, 2, chunks, optimizer, layout, {"step": 2, "config": {"model": model_section}})
    export_chunks(chunks, layout, live_out, cfg, template=path)


@pytest.mark.parametrize("family,sizes", [(llama, ParallelSizes(tp=2, dp=2)), (mixtral, ParallelSizes(dp=2, ep=2))],
                         ids=["llama_tp2xdp2", "mixtral_dp2xep2"])
def test_export_from_a_zero1_checkpoint_equals_the_live_export(tmp_path, family, sizes):
    path = family(tmp_path / "src")
    root, live = str(tmp_path / "ckpt"), str(tmp_path / "live")
    run_on_ranks(zero_checkpoint_worker, sizes.world_size, path, root, live, sizes, timeout_s=240)
    exported = export_checkpoint(root, str(tmp_path / "from_dcp"))  # template: the imported directory
    assert_same_files(live, exported)
    trained, original = _tensors(exported), _tensors(path)
    assert not torch.equal(trained["model.norm.weight"][1], original["model.norm.weight"][1])  # it did train


def test_config_round_trips_through_config_json():
    for cfg in (compose(["model=llama32_1b"]).model_config(), compose(["model=llama_tiny"]).model_config(),
                compose(["model=gpt2_tiny"]).model_config(), compose(["model=mixtral_8x7b"]).model_config()):
        mapping = Mapping(cfg)
        hf = mapping.family.to_hf_config(cfg)
        assert model_config_from_hf(hf) == cfg.with_(vocab_pad_multiple=1)


def _losses_on_ranks(rank, world, overrides):
    from megatron_lite.training.trainer import train

    return train(compose(overrides))["train_loss"]


@pytest.mark.parametrize("family,steps,layout", [
    pytest.param(llama, 20, ["parallel.tp=2", "parallel.pp=2"], marks=pytest.mark.matrix),  # import and TP x PP
    (mixtral, 6, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2"])],                    # training: tested apart
    ids=["llama_tp2xpp2", "mixtral_pp2xdp2xep2"])
def test_fine_tuning_from_an_imported_model_is_the_same_in_parallel(tmp_path, family, steps, layout):
    """Training from a Hugging Face directory: the same losses at TP2 x PP2 (LLaMA, 20 steps) and with the
    experts over EP2 (Mixtral) as in one process."""
    from megatron_lite.data.tokenizer import train_bpe_tokenizer

    path = family(tmp_path / "ft", vocab=300)
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    train_bpe_tokenizer([text[i:i + 400] for i in range(0, len(text), 400)], 300, os.path.join(path, "tokenizer.json"))
    common = [f"data.cache_dir={tmp_path / 'data'}", "checkpoint.dir=null", "model=hf", f"model.path={path}",
              f"trainer.max_steps={steps}", "trainer.seq_length=32", "trainer.micro_batch_size=2",
              "trainer.global_batch_size=8", "trainer.eval_interval=100", "trainer.sample_tokens=0",
              "optim.warmup_steps=2", "optim.lr=1e-3"]
    cfg = compose(common)
    assert (cfg.data.tokenizer, cfg.data.tokenizer_path) == ("hf", os.path.join(path, "tokenizer.json"))
    serial = run_on_ranks(_losses_on_ranks, 1, common, timeout_s=240)[0]
    parallel = run_on_ranks(_losses_on_ranks, 4, [*common, *layout], timeout_s=240)[0]
    assert parallel == pytest.approx(serial, rel=1e-5)
    assert serial[-1] < serial[0]


# ---- bad input: a clear error before any process group --------------------------------------------

def _edit_config(path, **changes):
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(changes)
    json.dump(config, open(config_path, "w"))


def test_bad_directories_are_named_before_anything_runs(tmp_path):
    with pytest.raises(HFCheckpointError, match="has no config.json"):
        check_hf_directory(str(tmp_path))
    with pytest.raises(ValueError, match="has no config.json"):
        compose(["model=hf", f"model.path={tmp_path}"])

    bert = llama(tmp_path / "bert")
    _edit_config(bert, model_type="bert")
    with pytest.raises(UnsupportedModel, match="model_type='bert' is not supported"):
        check_hf_directory(bert)

    gelu = llama(tmp_path / "gelu")
    _edit_config(gelu, hidden_act="gelu")
    with pytest.raises(UnsupportedModel, match="hidden_act='gelu' is not supported"):
        check_hf_directory(gelu)
    yarn = llama(tmp_path / "yarn")
    _edit_config(yarn, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(UnsupportedModel, match="rope type 'yarn' is not supported"):
        check_hf_directory(yarn)

    wrong_shape = llama(tmp_path / "shape")
    _edit_config(wrong_shape, intermediate_size=128)
    with pytest.raises(HFCheckpointError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[96, 64\] "
                                                r"but config.json implies \[128, 64\]"):
        check_hf_directory(wrong_shape)

    truncated = llama(tmp_path / "truncated")
    file = os.path.join(truncated, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 1000)
    with pytest.raises(HFCheckpointError, match="model.safetensors is truncated"):
        check_hf_directory(truncated)

    extra = llama(tmp_path / "extra")
    tensors = {k: t for k, (_, t) in _tensors(extra).items()}
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    del tensors["model.norm.weight"]
    save_file(tensors, os.path.join(extra, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match="lacks 1 tensor.*model.norm.weight"):
        check_hf_directory(extra)
    tensors["model.norm.weight"] = torch.ones(64)
    save_file(tensors, os.path.join(extra, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match="no rule of the llama table consumes: model.layers.0.self_attn.q_norm"):
        check_hf_directory(extra)


def test_the_training_script_rejects_a_bad_layout_for_an_hf_model(tmp_path):
    from megatron_lite.training.setup import check_run_config

    path = llama(tmp_path / "m", heads=8, kv_heads=2)
    cfg = compose(["model=hf", f"model.path={path}", "parallel.tp=3"])
    with pytest.raises(ValueError, match="model.num_heads=8 is not divisible by parallel.tp=3"):
        check_run_config(cfg, 3)
    truncated = os.path.join(path, "model.safetensors")
    with open(truncated, "r+b") as f:
        f.truncate(100)
    with pytest.raises(HFCheckpointError, match="truncated"):
        check_run_config(compose(["model=hf", f"model.path={path}"]), 1)
