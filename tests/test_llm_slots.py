"""The in-flight budget hands a freed slot to the oldest batch's request.

Two batches sharing one budget (a threads pool's slots, each batch pipelined a few
questions at a time) must not finish together: with first-come slots the second
batch's early requests overtake the first batch's later ones, both batches end at
once, and the endpoint idles while both slots fetch and retrieve their next batch.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from common.generators.slots import PrioritySlots
from tests.faults import FakeLLM
from tests.test_llm_budget import generator, user


def test_a_freed_slot_goes_to_the_lowest_order_then_first_come() -> None:
    async def scenario() -> list[str]:
        slots = PrioritySlots(1)
        granted: list[str] = []

        async def take(name: str, order: float) -> None:
            async with slots.hold(order):
                granted.append(name)
                await asyncio.sleep(0.01)

        holder = asyncio.create_task(take("holder", 0.0))
        await asyncio.sleep(0)  # the holder has the one slot
        tasks = [asyncio.create_task(take(name, order)) for name, order in
                 [("late batch", 2.0), ("old batch a", 1.0), ("old batch b", 1.0)]]
        await asyncio.gather(holder, *tasks)
        assert slots.in_use == 0 and slots.waiting == 0
        return granted

    assert asyncio.run(scenario()) == ["holder", "old batch a", "old batch b", "late batch"]


def test_a_cancelled_waiter_takes_no_slot_and_a_cancelled_grant_gives_it_back() -> None:
    async def scenario() -> None:
        slots = PrioritySlots(1)
        await slots.acquire(0.0)
        waiting = asyncio.create_task(slots.acquire(1.0))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        slots.release()  # the cancelled waiter is skipped: the slot is free again
        assert slots.in_use == 0
        await asyncio.wait_for(slots.acquire(2.0), 1)

        granted = asyncio.create_task(slots.acquire(3.0))
        await asyncio.sleep(0)
        slots.release()  # grants the waiter ...
        granted.cancel()  # ... which is cancelled before it runs: the slot comes back
        with pytest.raises(asyncio.CancelledError):
            await granted
        assert slots.in_use == 0
        await asyncio.wait_for(slots.acquire(4.0), 1)
        assert slots.in_use == 1

    asyncio.run(scenario())


def test_the_older_batch_is_answered_before_a_newer_one_overtakes_it() -> None:
    """Batch A sends its first group, batch B (begun later) its group, then A its second
    group, on a budget of 4: A's second group goes before B's, so A ends first."""
    with FakeLLM(delay_s=0.3) as server:
        gen = generator(server.base_url, max_in_flight=4)
        try:
            a_began, b_began = time.monotonic(), time.monotonic() + 1.0
            first = gen.submit([user(f"A {i}") for i in range(4)], order=a_began)
            time.sleep(0.1)  # A's group holds every slot
            newer = gen.submit([user(f"B {i}") for i in range(4)], order=b_began)
            time.sleep(0.05)
            second = gen.submit([user(f"A {i}") for i in range(4, 8)], order=a_began)
            for future in (first, second, newer):
                assert all(g.ok for g in future.result(30))
        finally:
            gen.close()
    arrived = [r["content"].split()[0] for r in sorted(server.requests, key=lambda r: r["at"])]
    assert arrived == ["A"] * 8 + ["B"] * 4, arrived
    assert server.max_in_flight == 4
