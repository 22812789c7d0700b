"""Generation (megatron_lite/inference): KV-cached prefill and decode under TP, PP (groups rotating
through the stages), TP x PP, TP beyond the KV heads and DP replicas give, at every step, the logits
of the serial model's full recompute without a cache, the same greedy tokens, and the same seeded
samples; greedy tokens equal transformers' generate on a locally built LLaMA; bad input fails clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_lite.inference import Generator, SamplingParams
from megatron_lite.inference.engine import schedule_ticks, unit_at
from megatron_lite.inference.kv_cache import KVCache
from megatron_lite.models.config import MoEConfig, gpt2_config, llama_config
from megatron_lite.models.partition import build_model_chunks
from megatron_lite.parallel.comm import CommStats
from megatron_lite.parallel.layout import ParallelLayout, ParallelSizes
from megatron_lite.parallel.spawn import run_on_ranks

VOCAB = 97  # odd: padded under every TP size
LLAMA = llama_config(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                     max_seq_len=128)
GPT2 = gpt2_config(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=128)
PROMPTS = [[int(t) for t in torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (5, 2, 9, 7)]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, seed=3)
MULTI_RANK_STEPS = 64


def recompute_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Next-token logits [steps, vocab] from one full forward, without a cache, over prompt + tokens."""
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens]))[0, :, :VOCAB]
    return full[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def check_against_recompute(model, prompts, result, atol=1e-5) -> float:
    model.eval()
    worst = 0.0
    for prompt, tokens, logits in zip(prompts, result.tokens, result.logits):
        reference = recompute_logits(model, prompt, tokens)
        assert len(logits) == len(tokens) == reference.shape[0]
        worst = max(worst, (torch.stack(logits) - reference).abs().max().item())
        assert reference.argmax(-1).tolist() == tokens  # greedy: the argmax of the recomputed logits
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def serial():
    """Per config: the serial model and its greedy and sampled generations."""
    out = {}
    for name, cfg in (("llama", LLAMA), ("gpt2", GPT2)):
        generator = Generator(cfg, seed=0)
        greedy = generator.generate(PROMPTS, max_new_tokens=64, eos_id=None, keep_logits=True)
        sampled = generator.generate(PROMPTS, max_new_tokens=MULTI_RANK_STEPS, eos_id=None, **SAMPLED)
        out[name] = (generator.chunks[0], greedy, sampled)
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_serial_cache_matches_full_recompute(serial, name):
    model, greedy, _ = serial[name]
    assert all(len(t) == 64 for t in greedy.tokens)
    check_against_recompute(model, PROMPTS, greedy)


def test_padding_and_batching_never_change_a_sequence(serial):
    """A prompt generated alone, or in a batch next to longer/shorter prompts, gives the same tokens."""
    _, greedy, sampled = serial["llama"]
    generator = Generator(LLAMA, seed=0)
    for i in (1, 2):
        alone = generator.generate([PROMPTS[i]], max_new_tokens=64, eos_id=None)
        assert alone.tokens[0] == greedy.tokens[i]
    # Seeds are per request: request i of a batch draws from seed (3, i) wherever it runs.
    split = generator.generate(PROMPTS, max_new_tokens=MULTI_RANK_STEPS, eos_id=None, groups=3, **SAMPLED)
    assert split.tokens == sampled.tokens
    other_seed = generator.generate(PROMPTS, max_new_tokens=8, eos_id=None, **{**SAMPLED, "seed": 4}).tokens
    assert [t[:8] for t in sampled.tokens] != other_seed


def test_equal_lengths_attend_without_a_mask(serial, monkeypatch):
    """Prompts of one length take the unmasked path (causal prefill, decode over every slot) at every step,
    and it gives the full recompute's logits."""
    from megatron_lite.inference.kv_cache import CacheStep

    masked, post_init = [], CacheStep.__post_init__

    def record(step):
        post_init(step)
        masked.append(step.mask is not None)

    monkeypatch.setattr(CacheStep, "__post_init__", record)
    model, _, _ = serial["llama"]
    prompts = [PROMPTS[0], PROMPTS[0][::-1], PROMPTS[3][:5]]
    result = Generator(LLAMA, chunks=[model]).generate(prompts, max_new_tokens=16, eos_id=None, keep_logits=True)
    check_against_recompute(model, prompts, result)
    assert len(masked) == 16 and not any(masked)
    Generator(LLAMA, chunks=[model]).generate(PROMPTS[:2], max_new_tokens=2, eos_id=None)
    assert masked[16:] == [True, True]  # lengths 5 and 2: masked


def test_stop_at_eos_per_sequence(serial):
    _, greedy, _ = serial["llama"]
    eos = greedy.tokens[0][3]  # the 4th token of request 0 becomes its end
    result = Generator(LLAMA, seed=0).generate(PROMPTS, max_new_tokens=64, eos_id=eos)
    for tokens, full in zip(result.tokens, greedy.tokens):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert tokens == full[:cut]
    assert len(result.tokens[0]) == 4


def layout_worker(rank, world, tp, pp, dp, groups, cfg, tp_overlap=False):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp, dp=dp))
    generator = Generator(cfg, layout, build_model_chunks(cfg, layout, seed=0), tp_overlap=tp_overlap)
    greedy = generator.generate(PROMPTS, max_new_tokens=MULTI_RANK_STEPS, eos_id=None, groups=groups,
                                keep_logits=True)
    comm_bytes = dict(layout.stats.bytes)
    sampled = generator.generate(PROMPTS, max_new_tokens=MULTI_RANK_STEPS, eos_id=None, groups=groups, **SAMPLED)
    return {"greedy": greedy, "sampled": sampled.tokens, "comm": comm_bytes, "pp": layout.pp.rank,
            "tp": layout.tp.rank, "dp": layout.dp.rank}


CASES = {  # name: (model, tp, pp, dp, groups[, TP all-reduces overlapped with another micro-batch's compute])
    "tp2": ("llama", 2, 1, 1, 1),
    "tp2xpp2_walk_overlap": ("llama", 2, 2, 1, 1, True),
    "pp2_rotating_2_groups": ("llama", 1, 2, 1, 2),
    "tp2xpp2_rotating_2_groups": ("llama", 2, 2, 1, 2),
    "pp4_rotating_4_groups": ("llama", 1, 4, 1, 4),
    "tp4_replicated_kv": ("llama", 4, 1, 1, 1),
    "dp2_replicas": ("llama", 1, 1, 2, 1),
    "gpt2_tp2xpp2_tied_learned_positions": ("gpt2", 2, 2, 1, 2),
}
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


@pytest.mark.parametrize("case", list(CASES))
def test_layouts_match_serial(serial, case):
    name, tp, pp, dp, groups, *overlap = CASES[case]
    cfg = CONFIGS[name]
    model, greedy, sampled = serial[name]
    results = run_on_ranks(layout_worker, tp * pp * dp, tp, pp, dp, groups, cfg, *overlap, timeout_s=120)
    for res in results:  # every rank returns every request's tokens
        assert res["greedy"].tokens == [t[:MULTI_RANK_STEPS] for t in greedy.tokens]
        assert res["sampled"] == sampled.tokens
    last = [res for res in results if res["pp"] == pp - 1 and res["tp"] == 0]
    for res in last:  # every replica's last stage holds every request's logits (gathered over DP)
        check_against_recompute(model, PROMPTS, res["greedy"])
    check_comm_volume(results, cfg, tp, pp, groups)


def check_comm_volume(results, cfg, tp, pp, groups):
    """Per rank: TP all-reduces 2 per layer of [b, s, hidden] fp32 per step (prefill s = the group's longest
    prompt, decode s = 1), and one more on the first stage (vocab-parallel embedding); PP one send per stage
    boundary of the same activation; the last stage sends the step's tokens (int64) to each other stage."""
    h, steps, layers = cfg.hidden_size, MULTI_RANK_STEPS, cfg.num_layers // pp
    bounds = [round(i * len(PROMPTS) / groups) for i in range(groups + 1)]
    sets = [PROMPTS[bounds[g]:bounds[g + 1]] for g in range(groups)]
    tokens = sum(len(s) * (max(map(len, s)) + steps - 1) for s in sets)  # positions run through each layer
    for res in results:
        comm = res["comm"]
        if tp > 1:
            per_token = 2 * layers + (res["pp"] == 0)
            assert comm[("tp", "all_reduce")] == per_token * tokens * h * 4
        if pp > 1 and res["pp"] < pp - 1:
            assert comm[("pp", "send")] == tokens * h * 4
        if pp > 1 and res["pp"] == pp - 1:  # the tokens of every step to each other stage
            assert comm[("pp", "send")] == (pp - 1) * steps * len(PROMPTS) * 8


def test_hf_llama_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.interop import load_hf_weights, model_config_from_hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    cfg = model_config_from_hf(json.load(open(os.path.join(tmp_path, "config.json"))))
    chunks = build_model_chunks(cfg, ParallelLayout.serial(), seed=0, initialize=False)
    load_hf_weights(chunks, str(tmp_path), cfg)
    ours = Generator(cfg, chunks=chunks).generate(PROMPTS, max_new_tokens=20, eos_id=None)
    for prompt, tokens in zip(PROMPTS, ours.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == tokens


def test_kv_cache_bytes():
    generator = Generator(LLAMA, seed=0)
    result = generator.generate(PROMPTS, max_new_tokens=4, max_length=32)
    # 2 (K and V) x layers x batch x KV heads x max length x head dim x 4 bytes
    assert result.kv_cache_bytes == 2 * 4 * len(PROMPTS) * 2 * 32 * 16 * 4
    # By default the cache holds the longest prompt (9) + max_new_tokens positions.
    assert generator.generate(PROMPTS, max_new_tokens=4).kv_cache_bytes == 2 * 4 * len(PROMPTS) * 2 * 13 * 16 * 4
    cache = KVCache.for_stage(generator.chunks[0], batch=3, max_length=10)
    assert cache.nbytes == 2 * 4 * 3 * 2 * 10 * 16 * 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1] * 129]), "longer than the maximum length 128"),
    (dict(prompts=[[1, 2, 3]], max_new_tokens=126), "overflows the KV cache"),
    (dict(prompts=[[1, 2, 3]], max_new_tokens=8, max_length=10), "overflows the KV cache of 10"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, VOCAB]]), "outside the vocabulary"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature=-0.5 must be a finite number >= 0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_length=256), "exceeds model.max_seq_len=128"),
    (dict(prompts=["text"]), "text prompts need a tokenizer"),
])
def test_bad_requests_fail_clearly(kwargs, message):
    generator = Generator(LLAMA, seed=0)
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generator.generate(**kwargs)


def test_tp_not_dividing_heads_fails_clearly():
    layout = ParallelLayout.from_groups(ParallelSizes(tp=3), 0, CommStats())
    with pytest.raises(ValueError, match="model.num_heads=4 is not divisible by parallel.tp=3"):
        Generator(LLAMA, layout)


def test_sampling_filters():
    from megatron_lite.inference.sampling import filtered_probabilities, sample

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    probs, order = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert order[0, :2].tolist() == [1, 3] and (probs[0, 2:] == 0).all()
    probs, order = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (probs[0, 1:] == 0).all()  # the most likely token alone holds more than half the mass
    params = SamplingParams(temperature=1.0, top_k=2, seed=1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    drawn = sample(logits.expand(200, -1), params, gens)
    assert set(drawn.tolist()) == {1, 3}
    assert sample(logits, SamplingParams(), None).tolist() == [1]


MOE = LLAMA.with_(num_layers=2, moe=MoEConfig(num_experts=4, top_k=2, layers=(1,)))


def moe_worker(rank, world, tp, pp, dp, ep, eos):
    layout = ParallelLayout.from_mesh(ParallelSizes(tp=tp, pp=pp, dp=dp, ep=ep))
    generator = Generator(MOE, layout, build_model_chunks(MOE, layout, seed=0))
    return generator.generate(PROMPTS, max_new_tokens=16, eos_id=eos, groups=2).tokens


@pytest.mark.parametrize("tp, pp, dp, ep", [(1, 2, 2, 2)])
def test_moe_under_expert_parallelism(tp, pp, dp, ep):
    """The DP replicas of an EP group exchange tokens in every MoE layer: they run their steps together,
    also after one replica's requests ended at EOS (here request 0's only)."""
    generator = Generator(MOE, seed=0)
    greedy = generator.generate(PROMPTS, max_new_tokens=16, eos_id=None, keep_logits=True)
    check_against_recompute(generator.chunks[0], PROMPTS, greedy)
    eos = next(t for t in greedy.tokens[0] if not any(t in other for other in greedy.tokens[1:]))
    expected = generator.generate(PROMPTS, max_new_tokens=16, eos_id=eos).tokens
    assert len(expected[0]) < 16 and all(len(t) == 16 for t in expected[1:])
    for tokens in run_on_ranks(moe_worker, tp * pp * dp, tp, pp, dp, ep, eos, timeout_s=120):
        assert tokens == expected


@pytest.mark.parametrize("groups, stages", [(1, 1), (3, 1), (1, 2), (2, 2), (3, 2), (1, 4), (2, 4), (4, 4), (6, 4)])
def test_pipelined_schedule(groups, stages):
    """Every (step, group) unit visits the stages in order on consecutive ticks; a group's next step enters
    only after its last token is known; with groups >= stages every stage works at every tick between its
    first and last unit (with fewer, groups / stages of them). So at PP2 batch b in 2 groups takes 2K + 1
    ticks of b/2 sequences for K tokens, one group 2K ticks of b: up to 2x the tokens/s where a stage's time
    follows its batch and the stages have their own devices."""
    steps = 5
    ticks = schedule_ticks(groups, stages, steps)
    visits = {}
    for tick in range(ticks + stages + 2):
        for rank in range(stages):
            unit = unit_at(tick, rank, groups, stages, steps)
            if unit is not None:
                assert tick < ticks
                visits.setdefault(unit, []).append((tick, rank))
    assert set(visits) == {(k, g) for k in range(steps) for g in range(groups)}
    for (k, g), path in visits.items():
        first = path[0][0]
        assert path == [(first + r, r) for r in range(stages)]
        if k:
            assert first > visits[(k - 1, g)][-1][0]  # the token of step k-1 is known
    for rank in range(stages):
        busy = [t for t in range(ticks) if unit_at(t, rank, groups, stages, steps) is not None]
        window = busy[-1] - busy[0] + 1
        assert len(busy) == steps * groups
        if groups >= stages:  # no idle tick
            assert len(busy) == window
        else:  # busy `groups` ticks of every `stages`
            assert window == (steps - 1) * stages + groups
