"""Generation behaviour a client sees: batching, cancellation, sampling, stops, failures."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from engine_helpers import collect, one_torch_thread, run
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.engine.errors import (
    ChatTemplateError,
    EngineClosedError,
    InvalidSamplingParamsError,
    ModelPoisonedError,
    PromptTooLongError,
)
from modeldeploy.server.engine.sampling import SamplingParams
from modeldeploy.server.engine.scheduler import prefill_groups
from modeldeploy.server.errors import UnsupportedArchitectureError

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Hello, world! How are you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100",
    "Kubernetes runs containers",
    "Unicode: café, naïve, Größe",
    "system: You are a helpful assistant.",
    "for i in range(10):\n    if i % 2 == 0:",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def engine(tiny_models):
    """Tiny qwen2 in float32, 4 slots (fewer than 8 requests: admission happens mid-decode),
    a small prefill chunk so prompts are fed over several steps."""
    eng = load(
        tiny_models,
        "qwen2",
        max_concurrent=4,
        max_model_len=256,
        max_prompt_tokens=64,
        prefill_chunk=5,
    )
    yield eng
    eng.close()


def load(tiny_models, arch: str = "qwen2", **kw) -> Engine:
    """A float32 CPU engine on a tiny model (tests pass the limits they exercise)."""
    return Engine.load(tiny_models.hf(arch), dtype="float32", device="cpu", **kw)


def greedy(**kw):
    return {"temperature": 0.0, "ignore_eos": True, **kw}


def test_eight_concurrent_greedy_requests_equal_each_alone(engine: Engine) -> None:
    """Different lengths, so sequences leave mid-batch, others move into their slots
    (compaction) and waiting ones are admitted between decode steps."""
    lengths = [20, 7, 31, 12, 3, 25, 16, 9]
    jobs = list(zip(PROMPTS, lengths, strict=True))
    alone = [run(collect(engine, p, **greedy(max_tokens=n))) for p, n in jobs]

    async def together():
        return await asyncio.gather(*(collect(engine, p, **greedy(max_tokens=n)) for p, n in jobs))

    batched = run(together())
    for a, b, n in zip(alone, batched, lengths, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert b.finish_reason == "length"
        assert b.events[-1].usage.completion_tokens == n
    assert engine.stats().running == 0
    assert engine.scheduler.free_slots == [0, 1, 2, 3]


def test_prompts_arriving_together_prefill_in_one_forward_as_each_alone(tiny_models) -> None:
    """Four prompts of 9-12 tokens admitted in one step run as one padded prefill forward
    (the CPU kernels' rate rises with rows), yet every stream's tokens and logprobs are
    those it gets alone: the padding's K/V never reach a result."""
    eng = load(tiny_models, "qwen2", max_concurrent=4, max_model_len=128)
    try:
        prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate((12, 11, 9, 12))]
        params = greedy(max_tokens=6, logprobs=True)
        alone = [run(collect(eng, ids, **params)) for ids in prompts]
        widths: list[tuple[int, int]] = []
        model = eng.scheduler.model

        def recording(tokens, *args):
            widths.append(tuple(tokens.shape))
            return model(tokens, *args)

        eng.scheduler.model = recording

        async def together():
            with eng.scheduler.cond:  # admitted in one step: held until all four wait
                tasks = [asyncio.create_task(collect(eng, ids, **params)) for ids in prompts]
                while len(eng.scheduler.waiting) < len(prompts):
                    await asyncio.sleep(0)
            return await asyncio.gather(*tasks)

        batched = run(together())
    finally:
        eng.close()
    assert widths[0] == (4, 12)  # one prefill forward, rows padded to the longest prompt
    assert all(t == 1 for _, t in widths[1:])
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids
        got = [ev.logprobs[0]["logprob"] for ev in b.events]
        want = [ev.logprobs[0]["logprob"] for ev in a.events]
        assert got == pytest.approx(want, abs=1e-5)


def test_prefill_groups_bound_padding_budget_and_cache_end() -> None:
    def seq(slot: int, cached: int = 0) -> SimpleNamespace:
        return SimpleNamespace(slot=slot, cached=cached)

    def slots(groups) -> list[list[int]]:
        return [[s.slot for s, _ in g] for g in groups]

    a, b, c, d = seq(0), seq(1), seq(2), seq(3)
    # similar lengths run together, in slot order; a long chunk would pad short ones > 25%
    assert slots(prefill_groups([(a, 30), (b, 100), (c, 28), (d, 32)], 512, 4096)) == [
        [1],
        [0, 2, 3],
    ]
    # the budget counts padding: 3 rows x 170 > 500
    assert slots(prefill_groups([(a, 170), (b, 160), (c, 150)], 500, 4096)) == [[0, 1], [2]]
    # a row whose padded positions would pass the end of its cache slot runs alone
    assert slots(prefill_groups([(a, 10), (seq(4, cached=95), 5)], 512, 100)) == [[0], [4]]


def test_usage_counts_prompt_and_completion(engine: Engine) -> None:
    res = run(collect(engine, PROMPTS[0], **greedy(max_tokens=7)))
    usage = res.events[-1].usage
    assert usage.prompt_tokens == len(engine.encode(PROMPTS[0]))
    assert usage.completion_tokens == 7 == len(res.token_ids)
    assert all(ev.finish_reason is None for ev in res.events[:-1])


def test_cancelled_request_frees_its_slot(tiny_models) -> None:
    eng = load(tiny_models, "qwen2", max_concurrent=1, max_model_len=512)
    try:

        async def scenario():
            stream = eng.generate(PROMPTS[0], SamplingParams(**greedy(max_tokens=400)), "long")
            first = await stream.__anext__()
            assert first.finish_reason is None
            assert eng.stats().running == 1
            steps = eng.scheduler.steps
            await stream.aclose()
            deadline = time.monotonic() + 5
            while eng.stats().running and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            assert eng.stats().running == 0
            assert eng.scheduler.steps - steps <= 2
            # the only slot is free again: a new request runs to completion at once
            res = await asyncio.wait_for(collect(eng, PROMPTS[1], **greedy(max_tokens=5)), 30)
            assert res.finish_reason == "length"

            # cancelling the consuming task also frees it
            async def consume():
                async for _ in eng.generate(
                    PROMPTS[2], SamplingParams(**greedy(max_tokens=400)), "t"
                ):
                    pass

            task = asyncio.create_task(consume())
            while eng.stats().running == 0:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 5
            while eng.stats().running and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            assert eng.stats().running == 0

        run(scenario())
    finally:
        eng.close()


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 16, "ignore_eos": True}
    a = run(collect(engine, PROMPTS[0], seed=1234, **params))
    b = run(collect(engine, PROMPTS[0], seed=1234, **params))
    assert a.token_ids == b.token_ids

    async def with_company():  # the same seed inside a batch of other sampled requests
        others = [collect(engine, p, seed=i, **params) for i, p in enumerate(PROMPTS[1:4])]
        return await asyncio.gather(collect(engine, PROMPTS[0], seed=1234, **params), *others)

    assert run(with_company())[0].token_ids == a.token_ids
    outs = {tuple(run(collect(engine, PROMPTS[0], seed=s, **params)).token_ids) for s in (1, 2, 3)}
    assert len(outs) > 1


def test_sampling_filters_restrict_the_choice(engine: Engine) -> None:
    """top_k=1 is greedy whatever the temperature; min_p=1 keeps only the top token."""
    want = run(collect(engine, PROMPTS[3], **greedy(max_tokens=10))).token_ids
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        got = run(
            collect(
                engine, PROMPTS[3], temperature=1.5, max_tokens=10, ignore_eos=True, seed=7, **extra
            )
        )
        assert got.token_ids == want, extra


def test_repetition_penalty_changes_greedy_output(engine: Engine) -> None:
    plain = run(collect(engine, PROMPTS[6], **greedy(max_tokens=20))).token_ids
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself
    penalized = run(
        collect(
            engine, PROMPTS[6], repetition_penalty=5.0, repeat_last_n=-1, **greedy(max_tokens=20)
        )
    ).token_ids
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))
    presence = run(
        collect(engine, PROMPTS[6], presence_penalty=2.0, **greedy(max_tokens=20))
    ).token_ids
    assert presence != plain


def test_stop_string_split_across_tokens(engine: Engine) -> None:
    base = run(collect(engine, PROMPTS[2], **greedy(max_tokens=30)))
    pieces = [engine.tokenizer.decode([t]) for t in base.token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(
        i
        for i in range(3, len(pieces) - 1)
        if pieces[i].isprintable()
        and pieces[i + 1].isprintable()
        and pieces[i]
        and pieces[i + 1]
        and "".join(pieces[: i + 2]) == base.text[: len("".join(pieces[: i + 2]))]
    )
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    cut = base.text.find(stop)
    assert cut >= 0
    res = run(collect(engine, PROMPTS[2], stop=[stop], **greedy(max_tokens=30)))
    assert res.finish_reason == "stop"
    assert res.text == base.text[:cut]
    assert stop not in res.text


def test_stop_token_ids_and_eos(engine: Engine) -> None:
    base = run(collect(engine, PROMPTS[1], **greedy(max_tokens=12)))
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    res = run(collect(engine, PROMPTS[1], stop_token_ids=[target], **greedy(max_tokens=12)))
    assert res.finish_reason == "stop"
    assert res.token_ids == base.token_ids[: first + 1]
    assert res.text == engine.tokenizer.decode(base.token_ids[:first])
    # EOS ends generation unless ignore_eos
    engine.scheduler.eos_ids.add(target)
    try:
        res = run(collect(engine, PROMPTS[1], temperature=0.0, max_tokens=12))
        assert res.finish_reason == "stop" and len(res.token_ids) == first + 1
    finally:
        engine.scheduler.eos_ids.discard(target)


def test_logprobs_describe_the_chosen_tokens(engine: Engine) -> None:
    res = run(collect(engine, PROMPTS[0], logprobs=True, top_logprobs=3, **greedy(max_tokens=5)))
    for ev in res.events:
        (entry,) = ev.logprobs
        assert entry["token_id"] == ev.token_ids[0]
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert top[0]["token_id"] == entry["token_id"]  # greedy picks the most likely
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])
        assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert entry["logprob"] <= 0.0


def test_prompt_too_long_names_both_numbers(engine: Engine) -> None:
    ids = engine.encode(" ".join(PROMPTS) * 3)
    assert len(ids) > 64

    async def go():
        engine.generate(ids, SamplingParams(), "long")

    with pytest.raises(PromptTooLongError) as err:
        run(go())
    assert str(len(ids)) in str(err.value) and "64" in str(err.value)


def test_prompt_over_context_is_refused(tiny_models) -> None:
    eng = load(tiny_models, "qwen2", max_concurrent=1, max_model_len=16)
    try:
        ids = eng.encode(PROMPTS[7] + PROMPTS[3])
        assert len(ids) >= 16

        async def go():
            eng.generate(ids, SamplingParams(), "ctx")

        with pytest.raises(PromptTooLongError, match=f"{len(ids)} tokens.*15"):
            run(go())
        # a prompt that fits stops at the context end with 'length'
        res = run(collect(eng, ids[:10], **greedy(max_tokens=100)))
        assert res.finish_reason == "length" and len(res.token_ids) == 6
    finally:
        eng.close()


def test_invalid_sampling_params_are_refused(engine: Engine) -> None:
    async def go(**kw):
        engine.generate("hi", SamplingParams(**kw), "bad")

    for kw in ({"temperature": -1}, {"top_p": 0.0}, {"max_tokens": 0}, {"top_logprobs": 50}):
        with pytest.raises(InvalidSamplingParamsError, match=next(iter(kw))):
            run(go(**kw))


def test_device_error_poisons_the_engine(tiny_models) -> None:
    eng = load(tiny_models, "qwen2", max_concurrent=2, max_model_len=256)
    try:

        async def scenario():
            stream = eng.generate(PROMPTS[0], SamplingParams(**greedy(max_tokens=200)), "victim")
            await stream.__anext__()
            eng.inject_fault()
            with pytest.raises(ModelPoisonedError, match="reloaded"):
                async for _ in stream:
                    pass
            assert eng.poisoned
            assert "injected device fault" in eng.poison_reason
            with pytest.raises(ModelPoisonedError, match="reloaded"):
                eng.generate(PROMPTS[1], SamplingParams(), "next")
            assert eng.info()["poisoned"] is True

        run(scenario())
    finally:
        eng.close()


def test_fault_env_var_poisons_first_step(tiny_models, monkeypatch) -> None:
    monkeypatch.setenv("MODELDEPLOY_INJECT_DEVICE_FAULT", "1")
    eng = load(tiny_models, "llama", max_concurrent=1, max_model_len=64)
    try:
        with pytest.raises(ModelPoisonedError):
            run(collect(eng, "hello", max_tokens=3))
        assert eng.poisoned
    finally:
        eng.close()


def test_unsupported_architecture_names_found_and_supported(tiny_models, tmp_path) -> None:
    from fixtures.tiny_models import copy_model

    d = copy_model(tiny_models.hf("llama"), tmp_path / "m")
    cfg = (d / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "falcon"')
    (d / "config.json").write_text(cfg)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Engine.load(d, device="cpu")
    msg = str(err.value)
    assert "falcon" in msg and "qwen2" in msg and "gemma3" in msg


def test_info_reports_placement_and_tensors(engine: Engine) -> None:
    info = engine.info()
    assert info["architecture"] == "qwen2"
    assert info["dtype"] == "float32" and info["dtype_reason"] == "--dtype float32"
    assert info["device"] == "cpu"
    assert info["max_model_len"] == 256 and info["max_concurrent"] == 4
    assert info["memory"]["weights_bytes"] > 0 and info["memory"]["kv_cache_bytes"] > 0
    names = {t["name"] for t in engine.tensors()}
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_auto_dtype_follows_the_cpu(tiny_models) -> None:
    from modeldeploy.server.engine.device import cpu_has_fast_bf16

    eng = Engine.load(tiny_models.hf("qwen2"), device="cpu", max_concurrent=1, max_model_len=64)
    try:
        want = "bfloat16" if cpu_has_fast_bf16() else "float32"
        assert eng.info()["dtype"] == want
        assert eng.info()["dtype_reason"].startswith("auto")
        assert run(collect(eng, "hello", **greedy(max_tokens=3))).finish_reason == "length"
    finally:
        eng.close()


def test_close_ends_streams_in_flight(tiny_models) -> None:
    eng = load(tiny_models, "qwen2", max_concurrent=1, max_model_len=512)

    async def scenario():
        running = eng.generate(PROMPTS[0], SamplingParams(**greedy(max_tokens=400)), "a")
        waiting = eng.generate(PROMPTS[1], SamplingParams(**greedy(max_tokens=5)), "b")
        await running.__anext__()
        eng.close()
        for stream in (running, waiting):
            with pytest.raises(EngineClosedError):
                async for _ in stream:
                    pass
        with pytest.raises(EngineClosedError):
            eng.generate(PROMPTS[2], SamplingParams(), "c")

    run(scenario())


@pytest.mark.parametrize("key", ["tools", "add_generation_prompt", "bos_token", "messages"])
def test_reserved_template_kwargs_are_refused_by_name(engine, key: str) -> None:
    """A request's chat_template_kwargs may not re-set what the engine passes itself."""
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match=f"chat_template_kwargs key '{key}': reserved"):
        engine.chat_template(messages, template_kwargs={key: "x"})
    plain = engine.chat_template(messages)
    assert engine.chat_template(messages, template_kwargs={"enable_thinking": False}) == plain
