"""AsyncEngine on its own: outputs reach asyncio consumers, refusals raise, the loop stays free, stop is clean."""

import asyncio

import pytest

from fast_inference.engine.async_engine import AsyncEngine, EngineDeadError
from fast_inference.engine.sampling_params import SamplingParams

from .conftest import engine_factory


def test_async_engine_lifecycle(model_dir):
    async def main():
        loop = asyncio.get_running_loop()
        engine = AsyncEngine(engine_factory(model_dir))
        assert engine.state == "loading"
        engine.start(loop)
        await engine.wait_ready(120)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

        # The loop keeps running while the engine computes: a ticker gets many turns per request.
        ticks = 0
        stop_ticking = False

        async def ticker():
            nonlocal ticks
            while not stop_ticking:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.ensure_future(ticker())
        steps_before = engine.step_count
        stream = await engine.add_request("a", [5, 6, 7, 8], params)
        outputs = [out async for out in stream]
        stop_ticking = True
        await tick_task
        # Deltas (a slow consumer gets the ones it missed folded into one): together, the whole output.
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        tokens = [t for o in outputs for c in o.outputs for t in c.token_ids]
        assert len(tokens) == 24
        text = "".join(c.text for o in outputs for c in o.outputs)
        assert text == engine.engine.tokenizer.decode(tokens, skip_special_tokens=True)
        assert ticks > engine.step_count - steps_before

        async def folded(stream):
            acc = None
            async for delta in stream:
                if acc is None:
                    acc = delta
                else:
                    acc.add(delta)
            return acc

        # two concurrent requests with the same prompt agree (greedy)
        s1, s2 = await asyncio.gather(
            engine.add_request("b", [5, 6, 7, 8], params), engine.add_request("c", [5, 6, 7, 8], params)
        )
        last1 = await folded(s1)
        last2 = await folded(s2)
        assert last1.outputs[0].token_ids == last2.outputs[0].token_ids == tokens

        with pytest.raises(ValueError):  # refused by the engine: over the context limit
            await engine.add_request("d", [5] * 5000, params)
        with pytest.raises(ValueError):  # id in use
            engine._streams["busy"] = None
            try:
                await engine.add_request("busy", [5], params)
            finally:
                engine._streams.pop("busy")

        # abort frees everything within a step
        long = await engine.add_request("e", [5, 6], SamplingParams(max_tokens=500, ignore_eos=True))
        await long.__anext__()
        long.abort()
        for _ in range(200):
            stats = await engine.get_stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                break
            await asyncio.sleep(0.01)
        assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]

        vectors = await asyncio.gather(engine.embed([[1, 2, 3]]), engine.embed([[4, 5], [6]]))
        assert [len(v) for v in vectors] == [1, 2]

        await loop.run_in_executor(None, engine.shutdown)
        assert engine.state == "stopped"
        with pytest.raises(EngineDeadError):
            await engine.add_request("f", [5], params)
        with pytest.raises(EngineDeadError):
            await engine.embed([[1]])
        assert isinstance(await asyncio.wait_for(engine.get_stats(), 5), dict)

    asyncio.run(main())
