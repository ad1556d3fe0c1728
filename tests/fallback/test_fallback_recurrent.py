"""Recurrent-state models through the fallback: the ragged recurrences against per-sequence references, the
traced forward against transformers on each sequence alone, and the engine's state slots (mixed prefill + decode
batches, chunked prefill, preemption, abort, continuous decode) against transformers' greedy tokens."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fallback_sweep import NEW_TOKENS, hf_greedy_ids
from fallback_testing import make_checkpoint
from jaxrt_testing import assert_no_leak, chunked_prefill_logits, record_buckets

import jaxrt
from jaxrt.converters.fallback import build_fallback
from jaxrt.converters.fallback.ragged import RaggedLayout, ragged_conv1d, ragged_scan
from jaxrt.converters.loader import load_hf_config

ENGINE_MODEL = "zamba2"  # Mamba-2 mixers (conv + SSM state) and attention layers in one model
ENGINE = dict(
    impl="transformers",
    dtype="float32",
    chunked_prefill_size=16,
    max_running_requests=4,
    num_pages=256,
    page_size=4,
    context_length=96,
    skip_warmup=True,
    skip_tokenizer_init=True,
)


def _greedy(n: int = NEW_TOKENS) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "min_new_tokens": n}


# ====================================================================== ragged recurrences (no transformers)

# Three sequences and a padding sequence over 12 token rows (9 real + 3 padding):
#   seq 0: a fresh prompt (positions 0..4), slot 1
#   seq 1: a later prefill chunk (positions 7..9) continuing slot 2's state
#   seq 2: one decode token (position 4) of slot 0, whose row does not advance (slot_mapping -1, as a stopped
#          row of a continuous-decode dispatch): its state must come back unchanged
Q_LENS = [5, 3, 1]
STARTS = [0, 7, 4]
SLOTS = [1, 2, 0]
NUM_TOKENS, NUM_SEQS, NUM_SLOTS = 12, 4, 5


def _batch() -> SimpleNamespace:
    cu = np.zeros(NUM_SEQS + 1, np.int32)
    cu[1 : len(Q_LENS) + 1] = np.cumsum(Q_LENS)
    cu[len(Q_LENS) + 1 :] = sum(Q_LENS)
    positions = np.zeros(NUM_TOKENS, np.int32)
    slot_mapping = np.full(NUM_TOKENS, -1, np.int32)
    for i, (n, s) in enumerate(zip(Q_LENS, STARTS, strict=True)):
        positions[cu[i] : cu[i] + n] = np.arange(s, s + n)
        slot_mapping[cu[i] : cu[i] + n] = 100 + np.arange(cu[i], cu[i] + n)
    slot_mapping[cu[2]] = -1  # seq 2's row is inactive
    state_slots = np.full(NUM_SEQS, -1, np.int32)
    state_slots[: len(SLOTS)] = SLOTS
    return SimpleNamespace(
        input_ids=np.zeros(NUM_TOKENS, np.int32),
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu,
        num_seqs=np.array([len(Q_LENS)], np.int32),
        state_slots=state_slots,
    )


def _initial_states(pool: np.ndarray) -> list[np.ndarray]:
    return [np.zeros_like(pool[s]) if start == 0 else pool[s] for s, start in zip(SLOTS, STARTS, strict=True)]


def test_ragged_layout():
    lay = RaggedLayout.from_batch(_batch(), NUM_SLOTS)
    np.testing.assert_array_equal(lay.seq[:9], [0, 0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(lay.valid, [True] * 8 + [False] * 4)
    np.testing.assert_array_equal(lay.fresh[:3], [True, False, False])
    np.testing.assert_array_equal(lay.slots, SLOTS + [NUM_SLOTS - 1])  # padding -> scratch
    np.testing.assert_array_equal(lay.num_valid[:3], [5, 3, 0])


@pytest.mark.parametrize("kernel", [2, 4])
def test_ragged_conv1d_matches_per_sequence_convolution(kernel):
    rng = np.random.default_rng(0)
    channels = 6
    x = rng.standard_normal((NUM_TOKENS, channels)).astype(np.float32)
    w = rng.standard_normal((channels, kernel)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    pool = rng.standard_normal((NUM_SLOTS, channels, kernel - 1)).astype(np.float32)
    lay = RaggedLayout.from_batch(_batch(), NUM_SLOTS)
    init = jnp.where(lay.fresh[:, None, None], 0.0, jnp.asarray(pool)[lay.slots])
    y, new = ragged_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), init, lay)
    y, new = np.asarray(y), np.asarray(new)
    start = 0
    for i, (n, hist) in enumerate(zip(Q_LENS, _initial_states(pool), strict=True)):
        xs = x[start : start + n]
        valid = n if i != 2 else 0  # seq 2's row does not advance its state
        full = np.concatenate([hist, xs.T], axis=1)  # [channels, kernel - 1 + n]
        for t in range(n):
            expected = (full[:, t : t + kernel] * w).sum(1) + b  # output rows are computed for every token
            np.testing.assert_allclose(y[start + t], expected, rtol=1e-5, atol=1e-5)
        window = np.concatenate([hist, xs[:valid].T], axis=1)[:, -(kernel - 1) :]
        np.testing.assert_allclose(new[i], window, rtol=1e-6)
        start += n


def test_ragged_scan_matches_per_sequence_loop():
    rng = np.random.default_rng(1)
    dim = 3
    a = rng.uniform(0.5, 1.0, (NUM_TOKENS, dim)).astype(np.float32)
    u = rng.standard_normal((NUM_TOKENS, dim)).astype(np.float32)
    pool = rng.standard_normal((NUM_SLOTS, dim)).astype(np.float32)
    lay = RaggedLayout.from_batch(_batch(), NUM_SLOTS)
    init = jnp.where(lay.fresh[:, None], 0.0, jnp.asarray(pool)[lay.slots])

    def step(h, inp):
        a_t, u_t = inp
        h = a_t * h + u_t
        return h, 2.0 * h

    ys, finals = jax.jit(lambda i, xs: ragged_scan(step, i, xs, lay))(init, (jnp.asarray(a), jnp.asarray(u)))
    ys, finals = np.asarray(ys), np.asarray(finals)
    start = 0
    for i, (n, h) in enumerate(zip(Q_LENS, _initial_states(pool), strict=True)):
        h = h.copy()
        for t in range(start, start + n):
            if i != 2:
                h = a[t] * h + u[t]
                np.testing.assert_allclose(ys[t], 2 * h, rtol=1e-5)
        np.testing.assert_allclose(finals[i], h, rtol=1e-5)  # seq 2: unchanged
        start += n


@pytest.mark.parametrize("chunk", [2, 4, 16])
def test_ragged_ssd_matches_the_token_scan(chunk):
    """Mamba-2's chunked form: sequences that cross chunk boundaries, start inside a chunk from a carried-over
    state, or do not advance, give the outputs and final states of the token-by-token scan."""
    from jaxrt.converters.fallback.ragged import ragged_ssd

    rng = np.random.default_rng(2)
    heads, p, n = 2, 3, 4
    x = jnp.asarray(rng.standard_normal((NUM_TOKENS, heads, p)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.05, 0.5, (NUM_TOKENS, heads)), jnp.float32)
    A = jnp.asarray(-rng.uniform(0.5, 2.0, heads), jnp.float32)
    B = jnp.asarray(rng.standard_normal((NUM_TOKENS, heads, n)), jnp.float32)
    C = jnp.asarray(rng.standard_normal((NUM_TOKENS, heads, n)), jnp.float32)
    pool = jnp.asarray(rng.standard_normal((NUM_SLOTS, heads, p, n)), jnp.float32)
    lay = RaggedLayout.from_batch(_batch(), NUM_SLOTS)
    init = jnp.where(lay.fresh[:, None, None, None], 0.0, pool[lay.slots])

    def step(h, inp):
        x_t, dt_t, b_t, c_t = inp
        h = h * jnp.exp(dt_t * A)[:, None, None] + (x_t * dt_t[:, None])[:, :, None] * b_t[:, None, :]
        return h, jnp.sum(h * c_t[:, None, :], axis=-1)

    y_ref, f_ref = ragged_scan(step, init, (x, dt, B, C), lay)
    y, f = jax.jit(lambda *a: ragged_ssd(*a, lay, chunk))(x, dt, A, B, C, init)
    valid = np.asarray(lay.valid)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f)[:3], np.asarray(f_ref)[:3], rtol=1e-4, atol=1e-5)


# ====================================================================== traced forward vs transformers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {}


def _checkpoint(checkpoints: dict, tmp_path_factory, model_type: str) -> str:
    if model_type not in checkpoints:
        checkpoints[model_type] = make_checkpoint(tmp_path_factory.mktemp(f"fb_{model_type}"), model_type)
    return checkpoints[model_type]


@pytest.mark.parametrize(
    ("model_type", "ssd_chunk"),
    [("mamba2", 64), ("mamba2", 8), ("qwen3_next", 64)],
    ids=["mamba2-scan", "mamba2-ssd", "qwen3_next"],
)
@pytest.mark.parametrize("chunks", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_forward_logits_match_transformers_per_sequence(
    checkpoints, tmp_path_factory, monkeypatch, model_type, ssd_chunk, chunks
):
    """Several sequences in one ragged batch, prefilled in one or three chunks (state carried across chunks in
    the slots), against transformers run on each sequence alone. Mamba-2 both token by token and in its chunked
    form (8-row chunks over the 64-row step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxrt.converters.fallback import recurrent

    monkeypatch.setattr(recurrent, "SSD_CHUNK", ssd_chunk)
    monkeypatch.setattr(recurrent, "SSD_ON_CPU", True)
    ssd_calls = []
    ssd = recurrent.ragged_ssd
    monkeypatch.setattr(recurrent, "ragged_ssd", lambda *a: ssd_calls.append(1) or ssd(*a))
    path = _checkpoint(checkpoints, tmp_path_factory, model_type)
    ids = [list(range(5, 5 + n)) for n in (7, 19, 4)]
    ids = [[(t * 37) % 300 + 3 for t in p] for p in ids]
    cfg, forward, params = build_fallback(path, load_hf_config(path), "float32", "reference")
    assert cfg.state_specs, "a recurrent model declares its state"
    ours = chunked_prefill_logits(forward, params, cfg, ids, 4, chunks, 64, 4)
    assert bool(ssd_calls) == (model_type == "mamba2" and ssd_chunk < 64)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    for i, p in enumerate(ids):
        with torch.no_grad():
            expected = ref(torch.tensor([p])).logits[0, -1].numpy()
        np.testing.assert_allclose(ours[i], expected, atol=2e-4, rtol=2e-4)


# ====================================================================== engine: state slots


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp(f"fb_{ENGINE_MODEL}"), ENGINE_MODEL)


@pytest.fixture(scope="module")
def prompt_ids() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, 320, n).tolist() for n in (3, 29, 11, 40, 7)]


@pytest.fixture(scope="module")
def expected(engine_model, prompt_ids) -> list[list[int]]:
    return hf_greedy_ids(engine_model, prompt_ids)


@pytest.fixture(scope="module")
def llm(engine_model):
    with jaxrt.Engine(model_path=engine_model, **ENGINE) as engine:
        yield engine


def assert_slots_free(llm: jaxrt.Engine) -> None:
    assert_no_leak(llm)
    sched = llm.scheduler
    assert sorted(sched.free_page_rows) == list(range(sched.num_state_slots))


def test_engine_mixed_batches_and_chunked_prefill(llm, prompt_ids, expected):
    """Five requests, four running at a time: prefill chunks of 16 tokens next to decodes in the same steps."""
    assert llm.radix.disabled and llm.config.model.state_specs
    assert llm.scheduler.num_state_slots == 4
    outs = llm.generate(input_ids=prompt_ids, sampling_params=_greedy())
    assert [o["output_ids"] for o in outs] == expected
    assert_slots_free(llm)
    # slots are reused by later requests: same tokens again
    outs = llm.generate(input_ids=prompt_ids[::-1], sampling_params=_greedy())
    assert [o["output_ids"] for o in outs] == expected[::-1]
    assert_slots_free(llm)


def test_engine_preemption_recomputes_state(engine_model, prompt_ids, expected):
    """A KV pool too small for four requests at once: running requests are preempted and re-prefilled."""
    with jaxrt.Engine(model_path=engine_model, **{**ENGINE, "num_pages": 16}) as llm:
        outs = llm.generate(input_ids=prompt_ids, sampling_params=_greedy())
        assert llm.scheduler.num_preemptions > 0
        assert [o["output_ids"] for o in outs] == expected
        assert_slots_free(llm)


def test_engine_abort_frees_the_slot(llm, prompt_ids, expected):
    gen = llm.generate(input_ids=prompt_ids[1], sampling_params=_greedy(60), stream=True)
    assert next(gen)["meta_info"]["finish_reason"] is None
    gen.close()  # aborted mid-decode
    assert_slots_free(llm)
    outs = llm.generate(input_ids=prompt_ids, sampling_params=_greedy())
    assert [o["output_ids"] for o in outs] == expected
    assert_slots_free(llm)


def test_engine_continuous_decode_carries_state(engine_model, prompt_ids, expected):
    """Four decode steps per dispatch give the same tokens as single steps; rows stop at different steps."""
    limits = [16, 5, 10, 16, 3]
    # no min_new_tokens: rows under it need the host between tokens and never take several steps
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in limits]
    want = [e[:n] for e, n in zip(expected, limits, strict=True)]
    got, dispatches = {}, {}
    for steps in (1, 4):
        with jaxrt.Engine(model_path=engine_model, **{**ENGINE, "num_continuous_decode_steps": steps}) as llm:
            outs = llm.generate(input_ids=prompt_ids, sampling_params=params)
            got[steps] = [o["output_ids"] for o in outs]
            dispatches[steps] = llm.stats["num_steps"]
            assert_slots_free(llm)
    assert dispatches[4] < dispatches[1], dispatches  # the decode loop ran
    assert got[4] == got[1]
    assert got[1] == want  # (the reference suppresses eos; this model never picks it for these prompts)


def test_rwkv_rescaled_layers_match_transformers(tmp_path):
    """RWKV halves its hidden states every ``rescale_every`` blocks at inference (weights divided in place); the
    fallback keeps rescaling off, which computes the same function."""
    from fallback_sweep import jaxrt_greedy_ids, prompts

    path = make_checkpoint(tmp_path / "rwkv", "rwkv", num_hidden_layers=3, rescale_every=1)
    ids = prompts(320)[:2]
    assert jaxrt_greedy_ids(path, ids) == hf_greedy_ids(path, ids)


def test_state_slots_come_out_of_the_memory_budget():
    """On a device with memory stats, the state slots' bytes are taken from the KV pool's budget; state that
    does not fit is a clear error."""
    from jaxrt.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, StateSpec
    from jaxrt.model_runner import kv_bytes_per_page, plan_num_pages, state_bytes

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 8 << 30, "bytes_in_use": 0}

    def config(state_specs, max_running=7):
        model = ModelConfig("X", 64, 64, 64, 2, 4, 2, 16, 4096, state_specs=state_specs)
        return EngineConfig(
            "x",
            model,
            CacheConfig(mem_fraction_static=0.5),
            SchedulerConfig(max_running_requests=max_running, chunked_prefill_size=64, context_length=256),
        )

    plain, stateful = config(()), config((StateSpec((1024, 1024)), StateSpec((64, 3), "bfloat16")))
    assert state_bytes(plain) == 0
    assert state_bytes(stateful) == 8 * (1024 * 1024 * 4 + 64 * 3 * 2)
    per_page = kv_bytes_per_page(stateful)
    assert (
        plan_num_pages(plain, Device()) - plan_num_pages(stateful, Device())
        >= state_bytes(stateful) // per_page
    )
    with pytest.raises(ValueError, match="max_running_requests"):
        plan_num_pages(config(stateful.model.state_specs, max_running=1023), Device())


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    [
        "mamba2",
        "mamba",
        "qwen3_next",
        "kimi_linear",
        "lfm2",
        "minimax",
        "rwkv",
        "recurrent_gemma",
        "xlstm",
        "zaya",
    ],
)
def test_every_adapter_under_preemption_and_continuous_decode(tmp_path, model_type):
    """Each adapter family through the engine with a KV pool small enough to preempt and four decode steps per
    dispatch (rows stopping at different steps) gives the tokens of single steps on a large pool, and those are
    transformers' greedy tokens."""
    path = make_checkpoint(tmp_path / model_type, model_type)
    rng = np.random.default_rng(5)
    ids = [rng.integers(3, 320, n).tolist() for n in (3, 29, 11, 40, 7)]
    limits = [16, 5, 10, 16, 3]
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in limits]
    got = {}
    for steps, pages in ((1, 256), (4, 16)):
        cfg = {**ENGINE, "num_continuous_decode_steps": steps, "num_pages": pages}
        with jaxrt.Engine(model_path=path, **cfg) as llm:
            got[steps] = [o["output_ids"] for o in llm.generate(input_ids=ids, sampling_params=params)]
            if pages == 16:
                assert llm.scheduler.num_preemptions > 0
            assert_slots_free(llm)
    assert got[4] == got[1]
    expected = hf_greedy_ids(path, ids)  # eos suppressed there: compare rows that never produced it
    for out, exp, n in zip(got[1], expected, limits, strict=True):
        if 2 not in out:
            assert out == exp[:n]


def test_engine_single_token_bucket(engine_model, prompt_ids, expected):
    """The 1-token program (GPUs' default) through the fallback and the recurrent state: a lone request
    decodes in it and keeps transformers' greedy tokens; the next batch leaves it."""
    with jaxrt.Engine(model_path=engine_model, **ENGINE, single_token_bucket=True) as llm:
        assert llm.runner.token_buckets[0] == 1
        picked = record_buckets(llm)
        alone = llm.generate(input_ids=prompt_ids[1], sampling_params=_greedy())
        assert alone["output_ids"] == expected[1]
        assert picked.count(1) >= NEW_TOKENS - 1, picked
        outs = llm.generate(input_ids=prompt_ids[:3], sampling_params=_greedy())
        assert [o["output_ids"] for o in outs] == expected[:3]
        assert_slots_free(llm)
