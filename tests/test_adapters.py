"""Cost adapters and LLM judges on the real anthropic and openai SDK types, with no network.

Expected figures are computed here from the providers' published per-million-token rates.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from decimal import Decimal

import httpx2
import pytest
from anthropic import Anthropic, AsyncAnthropic
from anthropic.types import Message
from openai import OpenAI
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

import loomc
from loomc import Budget, ConfigError, SQLiteStore, StateRoundTripWarning, loop, predicate
from loomc.context import current_run
from loomc.adapters import AnthropicAdapter, OpenAIAdapter, UsageMissing

M = Decimal(1_000_000)
IDS = itertools.count(1)  # each reply a test builds gets its own id, as every API call's reply does
# Published rates, dollars per million tokens.
SONNET = {"input": Decimal("3"), "output": Decimal("15"), "read": Decimal("0.30"), "w5m": Decimal("3.75"),
          "w1h": Decimal("6")}
GPT4O = {"input": Decimal("2.50"), "cached": Decimal("1.25"), "output": Decimal("10")}
GPT5 = {"input": Decimal("1.25"), "cached": Decimal("0.125"), "output": Decimal("10")}


def message(usage: dict, text: str = "Yes.", model: str = "claude-sonnet-4-6") -> Message:
    return Message.model_validate({"id": f"msg_{next(IDS)}", "type": "message", "role": "assistant",
                                   "model": model, "content": [{"type": "text", "text": text}],
                                   "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})


def chat(usage: dict | None, tier: str | None = None, text: str = "yes", model: str = "gpt-4o") -> ChatCompletion:
    data = {"id": f"chatcmpl-{next(IDS)}", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}
    if usage is not None:
        data["usage"] = usage
    if tier:
        data["service_tier"] = tier
    return ChatCompletion.model_validate(data)


def charged_under_a_usd_cap(charge) -> loomc.Run:
    """A run of up to five steps under a $1.00 cap, each of which calls ``charge()``."""
    @loop(budget=Budget(usd=1.0, iterations=5), checkpoint="memory")
    def step(state):
        charge()
        return state + 1

    return step.run(0)


def response(usage: dict, tier: str | None = None) -> Response:
    data = {"id": f"resp_{next(IDS)}", "object": "response", "created_at": 1, "model": "gpt-5", "output": [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage}
    if tier:
        data["service_tier"] = tier
    return Response.model_validate(data)


@pytest.fixture(scope="module")
def sonnet():
    return AnthropicAdapter("claude-sonnet-4-6")


def test_anthropic_cache_reads_and_5m_writes_are_added_to_input(sonnet):
    msg = message({"input_tokens": 10, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 5000,
                   "output_tokens": 100,
                   "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0}})
    expected = (10 * SONNET["input"] + 1000 * SONNET["w5m"] + 5000 * SONNET["read"] + 100 * SONNET["output"]) / M
    assert sonnet.cost_from_response(msg) == expected == Decimal("0.00678")


def test_anthropic_1h_cache_writes_cost_more(sonnet):
    msg = message({"input_tokens": 10, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 5000,
                   "output_tokens": 100,
                   "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000}})
    expected = (10 * SONNET["input"] + 1000 * SONNET["w1h"] + 5000 * SONNET["read"] + 100 * SONNET["output"]) / M
    assert sonnet.cost_from_response(msg) == expected


def test_anthropic_thinking_tokens_are_not_added_twice_and_none_cache_fields_are_zero(sonnet):
    plain = message({"input_tokens": 1000, "output_tokens": 500})
    thinking = message({"input_tokens": 1000, "output_tokens": 500, "output_tokens_details": {"thinking_tokens": 300}})
    expected = (1000 * SONNET["input"] + 500 * SONNET["output"]) / M
    assert sonnet.cost_from_response(plain) == sonnet.cost_from_response(thinking) == expected


def test_anthropic_batch_tier_is_half_price(sonnet):
    batch = message({"input_tokens": 1000, "output_tokens": 500, "service_tier": "batch"})
    assert sonnet.cost_from_response(batch) == (1000 * SONNET["input"] + 500 * SONNET["output"]) / M / 2


def test_one_result_of_a_batch_api_is_priced_at_batch_prices_and_a_result_with_no_reply_is_named(sonnet):
    """A batch's results loop charged each item as it came: `the Anthropic response has no usage`, and the
    results that do hold a reply were left to be unwrapped, and to be known as batch priced, by hand."""
    from anthropic.types.messages import MessageBatchIndividualResponse

    def item(result: dict) -> MessageBatchIndividualResponse:
        return MessageBatchIndividualResponse.model_validate({"custom_id": f"doc-{next(IDS)}", "result": result})

    reply = message({"input_tokens": 1000, "output_tokens": 500})  # the usage need not say "batch"
    done = item({"type": "succeeded", "message": reply.model_dump()})
    half = (1000 * SONNET["input"] + 500 * SONNET["output"]) / M / 2
    assert sonnet.cost_from_response(done) == half
    errored = item({"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error",
                                                                           "message": "Overloaded"}}})
    with pytest.raises(UsageMissing, match=r"batch result 'doc-\d+' errored, so it holds no message to price: "
                                           r"charge the results that succeeded"):
        sonnet.cost_from_response(errored)
    gpt = OpenAIAdapter("gpt-4o")
    body = chat({"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300}).model_dump()
    line = {"id": "batch_req_1", "custom_id": "doc-1", "response": {"status_code": 200, "request_id": "r1",
                                                                    "body": body}, "error": None}
    assert gpt.cost_from_response(line) == (2000 * GPT4O["input"] + 300 * GPT4O["output"]) / M / 2
    failed = {"id": "batch_req_2", "custom_id": "doc-2", "response": None,
              "error": {"code": "batch_expired", "message": "expired"}}
    with pytest.raises(UsageMissing, match=r"batch output line 'doc-2' holds no reply to price \(status None"):
        gpt.cost_from_response(failed)

    @loop(budget=Budget(usd=1, iterations=1), checkpoint="memory")
    def collect(state):  # each batch result, charged as the loop reads it
        for result in (done, line):
            (sonnet if result is done else gpt).charge(result)
        return state + 1

    run = collect.run(0)
    assert run.history[0].cost == half + (2000 * GPT4O["input"] + 300 * GPT4O["output"]) / M / 2
    with pytest.warns(loomc.adapters.AlreadyPricedWarning):  # the message inside is the reply: counted once
        loop(budget=Budget(iterations=1), checkpoint="memory")(lambda s: [sonnet.charge(done), sonnet.charge(reply),
                                                                          s][-1]).run(0)


def test_openai_chat_cached_tokens_are_a_subset_of_prompt_tokens():
    adapter = OpenAIAdapter("gpt-4o")
    comp = chat({"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
                 "prompt_tokens_details": {"cached_tokens": 1024},
                 "completion_tokens_details": {"reasoning_tokens": 0}})
    expected = (976 * GPT4O["input"] + 1024 * GPT4O["cached"] + 300 * GPT4O["output"]) / M
    assert adapter.cost_from_response(comp) == expected
    none_details = chat({"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300})
    assert adapter.cost_from_response(none_details) == (2000 * GPT4O["input"] + 300 * GPT4O["output"]) / M


def test_openai_responses_api_reasoning_is_inside_output_and_tiers_are_honoured():
    adapter = OpenAIAdapter("gpt-5")
    usage = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 0},
             "output_tokens": 500,
             "output_tokens_details": {"reasoning_tokens": 300}, "total_tokens": 1500}
    standard = (600 * GPT5["input"] + 400 * GPT5["cached"] + 500 * GPT5["output"]) / M
    assert adapter.cost_from_response(response(usage)) == standard == Decimal("0.0058")
    assert adapter.cost_from_response(response(usage, tier="flex")) == standard / 2
    assert OpenAIAdapter("gpt-5", batch=True).cost_from_response(response(usage)) == standard / 2


def test_money_stays_decimal_without_float_drift(sonnet):
    msg = message({"input_tokens": 1, "output_tokens": 1})
    one = sonnet.cost_from_response(msg)
    assert isinstance(one, Decimal) and sum([one] * 1000, Decimal(0)) == one * 1000 == Decimal("0.018")


def test_an_unknown_model_is_refused_at_construction_unless_rates_are_given():
    with pytest.raises(ConfigError, match="rates="):
        AnthropicAdapter("claude-made-up-9")
    custom = AnthropicAdapter("claude-made-up-9", rates={"input": 2, "output": 10, "cache_read": "0.2"})
    msg = message({"input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 50}, model="claude-made-up-9")
    assert custom.cost_from_response(msg) == (100 * 2 + 1000 * Decimal("0.2") + 50 * 10) / M
    with pytest.raises(ConfigError, match="input"):
        AnthropicAdapter("x", rates={"output": 1})


def test_a_response_without_usage_is_an_error_under_a_usd_budget_never_a_silent_zero():
    adapter = OpenAIAdapter("gpt-4o")
    with pytest.raises(UsageMissing):
        adapter.cost_from_response(chat(None))

    @loop(budget=Budget(usd=1.0), cost_fn=adapter.cost_fn, checkpoint="memory")
    def step(state):
        return {"_response": chat(None)}

    with pytest.warns(StateRoundTripWarning):  # the failed step keeps its state, response included
        run = step.run({})
    assert run.status == "failed" and "USD budget is set" in run.history[0].error

    @loop(budget=Budget(iterations=1), cost_fn=adapter.cost_fn, checkpoint="memory")
    def uncapped(state):
        return {"_response": chat(None)}

    with pytest.warns(UserWarning) as caught:
        assert uncapped.run({}).total_cost == 0
    assert [type(w.message) for w in caught] == [UserWarning, StateRoundTripWarning]
    assert "counted as $0" in str(caught[0].message)
    assert "state['_response'] is a ChatCompletion, and comes back as a dict" in str(caught[1].message)

    @loop(budget=Budget(usd=1.0), checkpoint="memory")
    def charged(state):
        adapter.charge(chat(None))
        return {}

    assert "USD budget is set" in charged.run({}).history[0].error

    @loop(budget=Budget(iterations=1), checkpoint="memory")
    def charged_uncapped(state):
        adapter.charge(chat(None))
        return {}

    with pytest.warns(UserWarning, match="counted as \\$0"):
        assert charged_uncapped.run({}).total_cost == 0


def step_run_id() -> str:
    run = current_run()
    assert run is not None
    return run.id


def test_charge_records_the_price_of_a_response_at_once_as_a_line_item(tmp_path, sonnet):
    usage = {"input_tokens": 1000, "output_tokens": 100}
    per_call = (1000 * SONNET["input"] + 100 * SONNET["output"]) / M
    db = tmp_path / "c.db"
    seen = []

    @loop(budget=Budget(usd=1.0, iterations=2), checkpoint=str(db))
    def step(state):
        seen.append(sonnet.charge(message(usage)))
        assert SQLiteStore(db).pending_charges(step_run_id()) == {len(seen) - 1: per_call}  # written already
        sonnet.charge(message(usage), item="critique")
        return {"n": state["n"] + 1}

    run = step.run({"n": 0})
    assert seen == [per_call, per_call] and run.total_cost == 4 * per_call
    # Each charge is a line item: the one named, and the model's for the charge that names none.
    assert run.history[0].metrics["cost_items"] == {sonnet.model: str(per_call), "critique": str(per_call)}


def test_charges_tell_each_line_items_tokens_and_show_adds_them_up(tmp_path, sonnet):
    """Why did step 9 cost ten times step 1? The dollars alone do not say that the transcript grew:
    each adapter charge tells its tokens, added up by line item on the step and over the run."""
    from click.testing import CliRunner
    from loomc.cli import main
    db = str(tmp_path / "t.db")
    advised = beta_message({"input_tokens": 4000, "output_tokens": 1000, "iterations": [
        iteration("message", 2000, 400), iteration("advisor_message", 30000, 1500, "claude-opus-4-7"),
        iteration("compaction", 150000, 3000), iteration("message", 2000, 600)]})

    @loop(budget=Budget(usd=5.0, iterations=3), checkpoint=db)
    def step(state):
        sonnet.charge(message({"input_tokens": 1000 * (state + 1), "output_tokens": 100,
                               "cache_read_input_tokens": 500}))  # cache reads are a part of the input
        sonnet.charge(message({"input_tokens": 50, "output_tokens": 1}), item="judge")
        if state == 2:
            sonnet.charge(advised)  # served, compaction and advisor iterations: 184,000 in, 5,500 out
            with pytest.warns(loomc.adapters.AlreadyPricedWarning):
                sonnet.charge(advised)  # the same reply again: neither its dollars nor its tokens twice
        return state + 1

    run = step.run(0, run_id="tok")
    assert [s.metrics["tokens"] for s in run.history] == [
        {sonnet.model: {"input": 1500, "output": 100}, "judge": {"input": 50, "output": 1}},
        {sonnet.model: {"input": 2500, "output": 100}, "judge": {"input": 50, "output": 1}},
        {sonnet.model: {"input": 3500 + 184000, "output": 100 + 5500}, "judge": {"input": 50, "output": 1}}]
    shown = CliRunner().invoke(main, ["show", "tok", "--db", db]).output.splitlines()
    items = {sonnet.model: sum(Decimal(s.metrics["cost_items"][sonnet.model]) for s in run.history),
             "judge": 3 * (50 * SONNET["input"] + 1 * SONNET["output"]) / M}
    assert shown[4] == (f"By item: {sonnet.model} {loomc.errors.dollars(items[sonnet.model])} in 3 steps, 191,500 "
                        f"tokens in and 5,800 out; judge {loomc.errors.dollars(items['judge'])} in 3 steps, 150 "
                        "tokens in and 3 out")


def test_charge_with_tokens_needs_a_line_item_and_two_counts_and_counts_the_money_anyway(tmp_path):
    import asyncio
    db = tmp_path / "w.db"
    written = []

    @loop(budget=Budget(usd=1.0, iterations=3), checkpoint=str(db))
    def no_item(state):
        try:
            loomc.charge(0.25, tokens=(1200, 350))
        finally:
            written.append(SQLiteStore(db).pending_charges(step_run_id()))
        return state

    run = no_item.run(0)
    assert run.status == "failed" and run.total_cost == Decimal("0.25")
    assert written == [{0: Decimal("0.25")}], "written ahead before the error, as any charge"
    assert run.history[0].error == (
        "ConfigError: charge(usd, tokens=(1200, 350)) names no line item: tokens are counted by line item, so name "
        "the one they belong to, as in charge(usd, item='gpt-4o', tokens=(1200, 350)) (the $0.2500 charged is "
        "counted in the step)")
    for wrong in ((1200,), (1200, -1), (1200.0, 350), "12", (True, 350), {"input": 1200, "output": 350}):
        @loop(budget=Budget(usd=1.0, iterations=3), checkpoint="memory")
        def bad(state):
            loomc.charge(0.25, "gpt-4o", tokens=wrong)
            return state

        run = bad.run(0)
        assert run.status == "failed" and run.total_cost == Decimal("0.25")
        assert "give the call's (input, output) token counts, two whole numbers >= 0" in run.history[0].error

    @loop(budget=Budget(usd=1.0, iterations=2), checkpoint="memory")
    def told(state):
        loomc.charge(0.25, "gpt-4o", tokens=(1200, 350))
        loomc.charge(0.05, "gpt-4o", tokens=[100, 0])  # a list will do
        loomc.charge(0.01, "search")
        return state

    run = told.run(0)
    assert run.history[1].metrics["tokens"] == {"gpt-4o": {"input": 1300, "output": 350}}
    assert loomc.history.spend_by_item(run.history) == (
        "gpt-4o $0.6000 in 2 steps, 2,600 tokens in and 700 out; search $0.0200 in 2 steps")

    @loop(budget=Budget(usd=1.0, iterations=3), checkpoint=str(db))
    async def async_no_item(state):
        await loomc.acharge(0.25, tokens=(1200, 350))
        return state

    run = asyncio.run(async_no_item.run(0))
    assert run.status == "failed" and run.total_cost == Decimal("0.25")
    assert run.history[0].error.startswith("ConfigError: acharge(usd, tokens=(1200, 350)) names no line item")


def test_acharge_in_an_async_loop(sonnet):
    import asyncio
    @loop(budget=Budget(iterations=3), checkpoint="memory")
    async def step(state):
        await sonnet.acharge(message({"input_tokens": 2000, "output_tokens": 10}))
        return state + 1

    run = asyncio.run(step.run(0))
    assert run.total_cost == 3 * (2000 * SONNET["input"] + 10 * SONNET["output"]) / M
    assert run.history[2].metrics["cost_items"] == {sonnet.model: str(run.total_cost / 3)}
    assert run.history[2].metrics["tokens"] == {sonnet.model: {"input": 2000, "output": 10}}


def test_a_forgotten_await_on_acharge_still_counts_the_spend(sonnet, tmp_path):
    """Regression: `loomc.acharge(usd)` and `adapter.acharge(reply)` without `await` did nothing but make a
    coroutine Python warned of: the spend never reached the step, so the USD cap could not see it."""
    import asyncio
    import warnings
    usage = {"input_tokens": 2000, "output_tokens": 10}
    per_call = (2000 * SONNET["input"] + 10 * SONNET["output"]) / M
    db = str(tmp_path / "a.db")

    @loop(budget=Budget(iterations=2), checkpoint=db)
    async def forgot(state):
        loomc.acharge(0.01)
        sonnet.acharge(message(usage))
        return state + 1

    @loop(budget=Budget(iterations=2), checkpoint=db)
    async def awaited(state):
        await loomc.acharge(0.01)
        assert await sonnet.acharge(message(usage)) == per_call
        return state + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lost = asyncio.run(forgot.run(0))
        import gc
        gc.collect()
    assert lost.total_cost == 2 * (Decimal("0.01") + per_call), "counted though never awaited"
    told = {str(w.message) for w in caught if w.category is RuntimeWarning}
    assert told == {"coroutine 'loomc.acharge' was never awaited",
                    "coroutine 'AnthropicAdapter.acharge' was never awaited"}, told
    kept = asyncio.run(awaited.run(0))
    assert kept.total_cost == lost.total_cost, "awaited, each counted once"
    assert SQLiteStore(db).get_run(kept.id).total_cost == kept.total_cost


def test_cost_fn_reads_the_response_from_the_state_into_the_ledger(sonnet):
    @loop(budget=Budget(usd=0.05), cost_fn=sonnet.cost_fn, checkpoint="memory")
    def step(state):
        reply = message({"input_tokens": 1000, "output_tokens": 100})
        return {"n": state["n"] + 1, "_response": reply.model_dump()}

    run = step.run({"n": 0})
    per_call = (1000 * SONNET["input"] + 100 * SONNET["output"]) / M
    assert run.history[0].cost == per_call and run.total_cost == per_call * len(run.history)
    assert run.total_cost + per_call > Decimal("0.05") >= run.total_cost
    # The price is the model's line item, with the reply's tokens, as charge(reply) tells them (it told none).
    assert run.history[0].metrics["cost_items"] == {"claude-sonnet-4-6": str(per_call)}
    assert run.history[0].metrics["tokens"] == {"claude-sonnet-4-6": {"input": 1000, "output": 100}}
    from loomc.errors import dollars
    from loomc.history import spend_by_item
    assert spend_by_item(run.history) == (f"claude-sonnet-4-6 {dollars(run.total_cost)} in {run.steps} steps, "
                                          f"{1000 * run.steps:,} tokens in and {100 * run.steps:,} out")
    assert sonnet.cost_fn({"_response": message({"input_tokens": 10, "output_tokens": 1})}) > 0  # outside a run


def test_a_reply_priced_twice_is_counted_once(sonnet):
    """Regression: a reply priced by both charge(reply) and cost_fn was counted twice, and a state fn
    returned without a new call (nothing left to fix) had its old state['_response'] priced again on
    every such step: the ledger, and the USD cap, ran at up to twice the bill."""
    from loomc.adapters import AlreadyPricedWarning
    usage = {"input_tokens": 1000, "output_tokens": 100}
    per_call = (1000 * SONNET["input"] + 100 * SONNET["output"]) / M

    @loop(budget=Budget(usd=1.0, iterations=2), cost_fn=sonnet.cost_fn, checkpoint="memory")
    def both(state):
        reply = message(usage)
        sonnet.charge(reply)
        return {"n": state["n"] + 1, "_response": reply.model_dump()}

    def told(runner, state):
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = runner.run(state)
        return run, [str(w.message) for w in caught if w.category is AlreadyPricedWarning]

    run, warned = told(both, {"n": 0})
    assert [s.cost for s in run.history] == [per_call, per_call] and len(warned) == 2
    assert re.search(r"has priced response msg_\d+ already, so it is counted once, not again in step 0\. Price "
                     r"each reply one way", warned[0])

    @loop(budget=Budget(usd=1.0, iterations=4), cost_fn=sonnet.cost_fn, checkpoint="memory")
    def fixer(state):
        if state["n"] >= 2:  # nothing left to fix: no call, the state as it was
            return {**state, "n": state["n"] + 1}
        return {"n": state["n"] + 1, "_response": message(usage).model_dump()}

    run, warned = told(fixer, {"n": 0})
    assert [s.cost for s in run.history] == [per_call, per_call, 0, 0] and len(warned) == 2
    assert "not again in step 2" in warned[0] and "should not carry the old state['_response']" in warned[0]


def anthropic_client(replies: list[str], calls: list[dict], cls=Anthropic):
    def handler(request):
        calls.append(json.loads(request.content))
        text = replies[min(len(calls) - 1, len(replies) - 1)]
        return httpx2.Response(200, json=message({"input_tokens": 200, "output_tokens": 2}, text).model_dump())
    transport = httpx2.MockTransport(handler)
    client = httpx2.AsyncClient(transport=transport) if cls is AsyncAnthropic else httpx2.Client(transport=transport)
    return cls(api_key="test-key", http_client=client, max_retries=0)


def test_an_anthropic_judge_through_the_real_client_converges_and_bills_its_own_line_item(tmp_path, sonnet):
    calls: list[dict] = []
    client = anthropic_client(["No.", "no", "Yes."], calls)
    db = str(tmp_path / "j.db")

    @loop(budget=Budget(usd=1.0, iterations=10), converge_on=sonnet.judge(client, "Is {state} done? yes/no"),
          cost_fn=lambda s: 0.01, checkpoint=db)
    def draft(state):
        return state + 1

    run = draft.run(0)
    assert run.status == "completed" and run.state == 3 and len(calls) == 3
    assert calls[0]["model"] == "claude-sonnet-4-6" and "Is 1 done?" in calls[0]["messages"][0]["content"]
    judge_cost = (200 * SONNET["input"] + 2 * SONNET["output"]) / M
    assert run.history[0].metrics["cost_items"] == {"judge": str(judge_cost)}
    assert run.history[0].cost == Decimal("0.01") + judge_cost
    assert [s.metrics["judge"] for s in run.history] == [False, False, True]
    from loomc import load_history
    recorded = load_history(draft.store, run.id)
    assert draft.policy.replay(recorded).stopped_after == 3
    assert sonnet.judge(client, "Is {state} done? yes/no").replay(recorded).stopped_after == 3  # the same judge
    assert len(calls) == 3, "a replay never asks the judge again"
    # Another prompt to the same model is another judge: the recorded verdicts are not its own (it used to
    # read them, so a prompt tried by replay seemed to stop where the recorded one did).
    other = sonnet.judge(client, "Is {state} perfect? yes/no").replay(recorded)
    assert other.stopped_after is None and other.unjudged == ("judge(AnthropicAdapter('claude-sonnet-4-6').judge)",)


def test_a_judge_that_answers_in_markdown_or_goes_on_after_its_yes_converges_and_a_hedged_yes_is_told(sonnet,
                                                                                                        tmp_path):
    """Models often answer "**Yes**" or "Yes. The report ...": such a yes was a no, the loop never converged, and
    it paid for every call its budget allowed. A yes that goes on in its sentence stays a no, and is told once."""
    from loomc import HedgedVerdictWarning, LastGood
    for said in ("**Yes**", "Yes. The report covers every point the"):  # the second cut at max_tokens
        run = loop(budget=Budget(iterations=5), converge_on=sonnet.judge(anthropic_client([said], []), "Done?"),
                   checkpoint="memory")(lambda s: s + 1).run(0)
        assert run.status == "completed" and run.steps == 1, said
    calls: list[dict] = []
    hedging = anthropic_client(["Yes, but the intro is thin.", "Yes, the report is ready to send.", "Yes."], calls)
    with pytest.warns(HedgedVerdictWarning) as told:
        run = loop(budget=Budget(iterations=5), converge_on=sonnet.judge(hedging, "Done?"), checkpoint="memory")(
            lambda s: s + 1).run(0, run_id="hedged")
    assert run.steps == 3 and [s.metrics["judge"] for s in run.history] == [False, False, True]
    labelled = loop(budget=Budget(iterations=1), converge_on=sonnet.judge(anthropic_client(["**Answer:** yes"], []),
                                                                            "Done?"), checkpoint="memory")(
        lambda s: s + 1)
    with pytest.warns(HedgedVerdictWarning, match=r"answered '\*\*Answer:\*\* yes', which counts as a no"):
        assert labelled.run(0).history[0].metrics["judge"] is False
    assert len(told) == 1 and str(told[0].message) == (
        "loomc: judge(AnthropicAdapter('claude-sonnet-4-6').judge) of run hedged for step 0 answered 'Yes, but the "
        "intro is thin.', which counts as a no: a yes counts only alone or as the reply's first sentence ('Yes.', "
        "'**Yes**', 'Yes. The tests pass'), so that a 'yes, but ...' is never taken for one. Ask for one word "
        "('Answer with one word: yes or no'), or return True from the judge. (Told once per run.)")
    # Told once the step is committed, as the other checks are: turned into an error, it stops the run, losing nothing
    import warnings
    strict = loop(budget=Budget(iterations=5), converge_on=sonnet.judge(
        anthropic_client(["Yes, but the intro is thin."], []), "Done?"), backtrack=LastGood(),
        checkpoint=str(tmp_path / "strict.db"))(lambda s: s + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HedgedVerdictWarning)
        with pytest.raises(HedgedVerdictWarning):
            strict.run(0, run_id="strict")
    assert [(s.n, s.error, s.metrics["judge"]) for s in strict.store.load_steps("strict")] == [(0, None, False)]


def test_an_async_anthropic_judge_is_awaited_at_the_edge(sonnet):
    import asyncio
    calls: list[dict] = []
    client = anthropic_client(["no", "YES"], calls, cls=AsyncAnthropic)

    @loop(budget=Budget(iterations=5), converge_on=sonnet.judge(client, "done?"), checkpoint="memory")
    async def draft(state):
        return state + 1

    run = asyncio.run(draft.run(0))
    assert run.status == "completed" and run.state == 2 and len(calls) == 2


def test_an_openai_judge_through_the_real_client(tmp_path):
    calls: list[dict] = []

    def handler(request):
        calls.append(json.loads(request.content))
        text = "yes" if len(calls) >= 2 else "not yet"
        return httpx2.Response(200, json=chat({"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
                                              text=text).model_dump())

    client = OpenAI(api_key="test-key", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
                    max_retries=0)
    adapter = OpenAIAdapter("gpt-4o")
    run = loop(budget=Budget(iterations=5), converge_on=adapter.judge(client, "Done?"), checkpoint="memory")(
        lambda s: s + 1).run(0)
    assert run.status == "completed" and run.state == 2 and calls[0]["model"] == "gpt-4o"
    assert run.history[1].metrics["cost_items"]["judge"] == str((100 * GPT4O["input"] + 1 * GPT4O["output"]) / M)


def test_a_judge_whose_model_refuses_to_answer_gives_no_verdict_and_is_told(sonnet):
    """A chat reply that refuses has no text (content None): a no on every step, paid for, with nothing saying why
    the run never converged. It is now no verdict, recorded as None, and told once (NoVerdictWarning)."""
    from loomc import NoVerdictWarning

    def refusing(request):
        data = chat({"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}).model_dump()
        data["choices"][0]["message"].update(content=None, refusal="I can't help with that.")
        return httpx2.Response(200, json=data)

    client = OpenAI(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(refusing)), max_retries=0)
    judged = loop(budget=Budget(iterations=3), converge_on=OpenAIAdapter("gpt-4o").judge(client, "Done?"),
                  checkpoint="memory")(lambda s: s + 1)
    with pytest.warns(NoVerdictWarning, match=r"judge\(OpenAIAdapter\('gpt-4o'\)\.judge\) returned None for step 0"):
        run = judged.run(0)
    assert run.status == "budget_exhausted" and [s.metrics["judge"] for s in run.history] == [None] * 3
    assert "judge" in run.history[0].metrics["cost_items"], "the refusal is paid for all the same"
    said_no = loop(budget=Budget(iterations=1), converge_on=sonnet.judge(anthropic_client(["No."], []), "Done?"),
                   checkpoint="memory")(lambda s: s + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoVerdictWarning)
        assert said_no.run(0).history[0].metrics["judge"] is False  # a no is a verdict


def test_an_openai_judge_through_the_responses_api_for_a_model_only_it_serves(tmp_path):
    """A Responses-only model (the Chat Completions API answers 404) judges with api="responses"."""
    calls: list[tuple[str, dict]] = []

    def reply(text: str | None, status: str = "completed") -> dict:
        output = [] if text is None else [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return {"id": f"resp_{next(IDS)}", "object": "response", "created_at": 1, "model": "gpt-5", "status": status,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "output": output,
                "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": 16, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 116}}

    def handler(request):
        calls.append((request.url.path, json.loads(request.content)))
        return httpx2.Response(200, json=reply("Yes." if len(calls) >= 2 else "No."))

    client = OpenAI(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)), max_retries=0)
    gpt5 = OpenAIAdapter("gpt-5")
    run = loop(budget=Budget(iterations=5), converge_on=gpt5.judge(client, "Done?", api="responses"),
               checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "completed" and run.state == 2
    assert [path for path, _ in calls] == ["/v1/responses"] * 2
    assert calls[0][1]["max_output_tokens"] == 16, "the Responses API takes no limit below 16"
    assert calls[0][1]["input"].startswith("Done?\n\n")
    assert run.history[1].metrics["cost_items"]["judge"] == str((100 * GPT5["input"] + 16 * GPT5["output"]) / M)

    def thinking(request):  # a reasoning model spends the limit thinking: no text
        return httpx2.Response(200, json=reply(None, status="incomplete"))

    quiet = OpenAI(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(thinking)), max_retries=0)
    run = loop(budget=Budget(iterations=5), converge_on=gpt5.judge(quiet, "Done?", api="responses"),
               checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "failed" and run.steps == 1
    assert "give it room, as in OpenAIAdapter('gpt-5').judge(client, prompt, max_tokens=2000, api='responses')" \
        in run.reason
    with pytest.raises(ConfigError, match=r"judge\(api='completions'\): OpenAIAdapter asks through 'chat' or "
                                          r"'responses'"):
        gpt5.judge(client, "Done?", api="completions")
    with pytest.raises(ConfigError, match=r"AnthropicAdapter asks through 'messages'"):
        AnthropicAdapter("claude-sonnet-4-6").judge(client, "Done?", api="chat")


def test_a_call_the_api_refuses_for_good_ends_the_run_rather_than_a_backtracker_paying_for_every_step(sonnet):
    """Regression: a judge on a model the Chat Completions API does not serve (404: a Responses-only model), or
    with a bad key (401), failed its step; LastGood went on from the last good state, and the loop paid for every
    call of fn its budget allowed, the judge failing each time. An SDK error with status 401, 403 or 404 now ends
    the run, as a setup error does: the same request meets it again from any state."""
    import asyncio
    from loomc import LastGood

    def openai_refusing(status: int, message: str):
        def handler(request):
            return httpx2.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                           "param": None, "code": None}})
        return OpenAI(api_key="k", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)), max_retries=0)

    paid: list[int] = []

    def fix(state):
        paid.append(state)
        return state + 1

    stops = "; the next call would meet it again, so the run stopped instead of going on from another state"
    policy = dict(budget=Budget(usd=1, iterations=8), backtrack=LastGood(), cost_fn=lambda s: 0.1, checkpoint="memory")
    responses_only = openai_refusing(404, "This model is only supported in v1/responses and not in v1/chat/completions.")
    run = loop(converge_on=OpenAIAdapter("gpt-4o").judge(responses_only, "Done?"), **policy)(fix).run(0)
    assert run.status == "failed" and len(paid) == 1 and run.total_cost == Decimal("0.1")
    # The SDK words the status its own way and may change it between releases; loomc passes it through, so the
    # test holds the SDK's part to its class, status and message, and loomc's part to the letter.
    head, tail = run.reason.split(" (raised by ", 1)
    assert head.startswith("NotFoundError: ") and "404" in head and "only supported in v1/responses" in head
    assert tail == "judge(OpenAIAdapter('gpt-4o').judge), after fn returned: step 0 keeps the state fn returned)" + stops
    assert run.history[0].state == 1, "the step keeps what fn returned"

    def bad_key(request):
        return httpx2.Response(401, json={"type": "error", "error": {"type": "authentication_error",
                                                                      "message": "invalid x-api-key"}})
    async_client = AsyncAnthropic(api_key="k", http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(bad_key)),
                                  max_retries=0)

    async def afix(state):
        return fix(state)

    paid.clear()
    run = asyncio.run(loop(converge_on=sonnet.judge(async_client, "Done?"), **policy)(afix).run(0))
    assert run.status == "failed" and len(paid) == 1
    # ("Error code: 401 - ..." up to anthropic 1.x, "401 invalid x-api-key (path: ...)" from 2.x)
    head = run.reason.split(" (raised by ")[0]
    assert head.startswith("AuthenticationError: ") and "401" in head and "invalid x-api-key" in head, run.reason
    assert run.reason.endswith(stops)

    def calls_the_model(state):  # fn itself asking for a model the API does not serve
        responses_only.chat.completions.create(model="gpt-5-pro", messages=[{"role": "user", "content": "fix it"}])
        return state + 1

    run = loop(**policy)(calls_the_model).run(0)
    assert run.status == "failed" and run.steps == 1 and run.reason.endswith(stops)
    # A rate limit is no refusal of who or what was asked for: a backtracker goes on from it, as from any failure.
    paid.clear()
    limited = openai_refusing(429, "Rate limit reached")
    run = loop(converge_on=OpenAIAdapter("gpt-4o").judge(limited, "Done?"), **{**policy, "budget": Budget(iterations=3)})(
        fix).run(0)
    assert run.status == "budget_exhausted" and len(paid) == 3
    assert run.history[0].error.startswith("RateLimitError: ") and "429" in run.history[0].error


def test_a_judge_that_raises_is_recorded_on_its_step_not_swallowed():
    from loomc import LastGood, judge

    asked = []

    def flaky(state):
        asked.append(state)
        if len(asked) == 1:
            raise TimeoutError("judge timed out")
        return state >= 3

    run = loop(budget=Budget(iterations=6), converge_on=judge(flaky), backtrack=LastGood(), checkpoint="memory")(
        lambda s: s + 1).run(0)
    assert run.history[0].error == ("TimeoutError: judge timed out (raised by judge(flaky), after fn returned: step "
                                    "0 keeps the state fn returned)"), "the error names the judge, not fn"
    assert run.history[0].state == 1, "the step's state is kept"
    assert run.status == "completed" and run.state == 3


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_judge_is_asked_only_where_the_policy_reads_its_verdict(aio):
    """Left to right, as the policy decides: a paid judge right of a detector that fired, or under `a & judge` where
    `a` did not fire, cannot change the answer, and is not asked (it used to be asked after every step)."""
    import asyncio
    from conftest import sync_or_async
    from loomc import judge, score_plateau
    asked: list[int] = []

    def grade(state):
        asked.append(state)
        return "yes" if state >= 4 else "no"

    async def agrade(state):
        return grade(state)

    verdict = judge(agrade if aio else grade)

    def go(policy, scores=None):
        asked.clear()
        runner = loop(budget=Budget(iterations=8), converge_on=policy, checkpoint="memory",
                      scorer=None if scores is None else (lambda s: scores[s - 1]))(sync_or_async(lambda s: s + 1, aio))
        return asyncio.run(runner.run(0)) if aio else runner.run(0)

    run = go(predicate(lambda h: h[-1].state >= 3) | verdict)
    assert run.steps == 3 and run.reason == "predicate(<lambda>) is true" and asked == [1, 2]
    assert [s.metrics.get("judge") for s in run.history] == [False, False, None]  # not asked: nothing recorded
    run = go(verdict | predicate(lambda h: h[-1].state >= 3))  # on the left it is asked first, on every step
    assert run.steps == 3 and asked == [1, 2, 3]
    # Under &, only once the score has plateaued (the score is measured before the judges)
    run = go(score_plateau(2, min_delta=0.01) & verdict, scores=[0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert asked == [4] and run.steps == 4 and run.reason == "score_plateau: no improvement above 0.5 by more " \
        "than 0.01 in 2 scored steps and judge(agrade) said yes".replace("agrade", "agrade" if aio else "grade")
    assert (score_plateau(2, min_delta=0.01) & verdict).replay(run.history).stopped_after == 4
    # A detector left of it that raises: the judge is asked, and the policy's own decision then fails the run
    run = go(predicate(lambda h: h[-1].state["x"]) | verdict)
    assert run.status == "failed" and asked == [1] and run.reason.startswith("the policy raised TypeError")


def test_only_true_or_a_clear_yes_counts():
    from loomc.detectors import clear_yes
    assert [clear_yes(v) for v in (True, "Yes.", " yes ", "YES!", "true")] == [True] * 5
    assert [clear_yes(v) for v in (1, "yes, but", "no", "maybe", None, "Yes and no")] == [False] * 6
    # A yes in markdown, or as the first sentence of a reply that goes on (cut at the judge's token limit)
    assert [clear_yes(v) for v in ("**Yes**", "Yes.\n\nThe report is ready.", "Yes. The report covers all",
                                   "> **Yes.** All tests pass", "`yes`", "# Yes")] == [True] * 6
    assert [clear_yes(v) for v in ("**No**", "No. Yes", "Yes, the report is ready.", "Yes — nearly", "Yes?",
                                   "Yesterday", "Answer: yes", "")] == [False] * 8
    # numpy's True too, as a predicate takes it: a judge on a classifier's `probability > 0.5` was a no every
    # step, and the loop paid for every call its budget allowed.
    import numpy
    assert clear_yes(numpy.float64(0.7) > 0.5) and not clear_yes(numpy.False_) and not clear_yes(numpy.int64(1))
    assert predicate  # the judge is a detector like any other: it composes with |


def test_a_call_whose_cost_is_unknown_ends_a_usd_capped_run_even_with_a_backtracker():
    """LastGood retried after every call whose cost_fn raised (or whose response had no usage), so a
    $1.00 cap recorded thirty paid calls at $0. Under a USD cap an unknown cost now ends the run;
    without one, the backtracker goes on as before."""
    import asyncio
    from loomc import LastGood
    adapter = OpenAIAdapter("gpt-4o")
    calls: list[int] = []

    def broken_pricing(state):
        raise KeyError("usage")

    @loop(budget=Budget(usd=1.0, iterations=30), backtrack=LastGood(), cost_fn=broken_pricing, checkpoint="memory")
    def paid(s):
        calls.append(s)
        return s + 1

    run = paid.run(0)
    assert run.status == "failed" and len(calls) == 1
    assert run.reason == ("KeyError: 'usage' (raised by cost_fn, after fn returned: step 0 keeps the state fn "
                          "returned; the call's price from cost_fn is not in its cost); without what the call cost, "
                          "the USD cap cannot hold, so the run stopped instead of going on from another state")
    with pytest.raises(KeyError) as caught:
        paid(0)
    assert any("Fix the pricing, then resume the run" in note for note in caught.value.__notes__)

    @loop(budget=Budget(usd=1.0, iterations=30), backtrack=LastGood(), checkpoint="memory")
    def unpriced(s):
        calls.append(s)
        adapter.charge(chat(None))  # no usage on the response: UsageMissing
        return s + 1

    calls.clear()
    run = unpriced.run(0)
    assert run.status == "failed" and len(calls) == 1 and run.reason.startswith("UsageMissing: ")

    # A reply whose counts contradict each other (a proxy's: more cached tokens than input ones) cannot be
    # priced either. Its ValueError failed the step, and LastGood went on to the iteration cap, each call paid.
    @loop(budget=Budget(usd=1.0, iterations=30), backtrack=LastGood(), checkpoint="memory")
    def contradicted(s):
        calls.append(s)
        adapter.charge(chat({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 500}}))
        return s + 1

    calls.clear()
    run = contradicted.run(0)
    assert run.status == "failed" and len(calls) == 1 and run.reason.startswith(
        "CostUnknown: the reply's usage does not add up: cache reads and writes (500 + 0) exceed the 10 input tokens, "
        "so what it cost is not known; a USD budget is set")

    @loop(budget=Budget(usd=1.0, iterations=30), backtrack=LastGood(), cost_fn=broken_pricing, checkpoint="memory")
    async def apaid(s):
        calls.append(s)
        return s + 1

    async def abroken(state):
        raise KeyError("usage")

    @loop(budget=Budget(usd=1.0, iterations=30), backtrack=LastGood(), cost_fn=abroken, checkpoint="memory")
    async def apaid_async_cost(s):
        calls.append(s)
        return s + 1

    for runner in (apaid, apaid_async_cost):
        calls.clear()
        run = asyncio.run(runner.run(0))
        assert run.status == "failed" and len(calls) == 1 and run.reason.startswith("KeyError: 'usage' (raised by cost_fn")

    @loop(budget=Budget(iterations=5), backtrack=LastGood(), cost_fn=broken_pricing, checkpoint="memory")
    def uncapped(s):
        calls.append(s)
        return s + 1

    calls.clear()
    assert uncapped.run(0).status == "budget_exhausted" and len(calls) == 5  # no USD cap: the backtracker goes on


OPUS = {"input": Decimal("5"), "output": Decimal("25")}  # claude-opus-4-7, the advisor below


def beta_message(usage: dict, model: str = "claude-sonnet-4-6"):
    from anthropic.types.beta import BetaMessage
    return BetaMessage.model_validate({"id": f"msg_{next(IDS)}", "type": "message", "role": "assistant",
                                       "model": model, "content": [{"type": "text", "text": "Done."}],
                                       "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})


def iteration(kind: str, tokens_in: int, tokens_out: int, model: str | None = None, cache_read: int = 0) -> dict:
    entry = {"type": kind, "input_tokens": tokens_in, "output_tokens": tokens_out, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": cache_read}
    return {**entry, "model": model} if model else entry


def test_anthropic_iterations_tool_calls_and_an_advisor_are_each_priced_at_their_own_model(sonnet):
    """Before, this reply was priced from its top-level counts alone: $0.027 of the $0.7595 it cost.
    Compaction and advisor tokens are not in those counts, the advisor bills at Opus's prices, and each
    web search costs $0.01."""
    reply = beta_message({
        "input_tokens": 4000, "output_tokens": 1000,
        "server_tool_use": {"web_search_requests": 5, "web_fetch_requests": 2},
        "iterations": [iteration("message", 2000, 400), iteration("advisor_message", 30000, 1500, "claude-opus-4-7"),
                       iteration("compaction", 150000, 3000), iteration("message", 2000, 600)]})
    executor = (4000 * SONNET["input"] + 1000 * SONNET["output"]) / M
    advisor = (30000 * OPUS["input"] + 1500 * OPUS["output"]) / M
    compaction = (150000 * SONNET["input"] + 3000 * SONNET["output"]) / M
    searches = 5 * Decimal("10") / 1000  # web fetches are billed as tokens only
    assert sonnet.cost_from_response(reply) == executor + advisor + compaction + searches == Decimal("0.7595")
    plain = message({"input_tokens": 4000, "output_tokens": 1000,
                     "server_tool_use": {"web_search_requests": 5, "web_fetch_requests": 0}})
    assert sonnet.cost_from_response(plain) == executor + searches  # a plain Message's searches too


def test_anthropic_top_level_counts_are_charged_when_they_exceed_the_iterations(sonnet):
    """The serving iterations and the top-level counts are two readings of the same tokens; the
    dearer one is charged, so neither can undercount."""
    larger_top = beta_message({"input_tokens": 9000, "output_tokens": 900,
                               "iterations": [iteration("message", 2000, 400)]})
    assert sonnet.cost_from_response(larger_top) == (9000 * SONNET["input"] + 900 * SONNET["output"]) / M
    served_by_opus = beta_message({"input_tokens": 2000, "output_tokens": 400, "iterations": [
        iteration("message", 1000, 0), iteration("fallback_message", 1000, 400, "claude-opus-4-7")]})
    assert sonnet.cost_from_response(served_by_opus) == (
        1000 * SONNET["input"] + 1000 * OPUS["input"] + 400 * OPUS["output"]) / M


def test_a_model_or_tool_call_without_a_price_is_named_and_can_be_given_one(sonnet):
    from loomc import CostUnknown
    reply = beta_message({"input_tokens": 100, "output_tokens": 10, "iterations": [
        iteration("message", 100, 10), iteration("advisor_message", 1000, 100, "claude-made-up-9")]})
    with pytest.raises(CostUnknown, match="'claude-made-up-9', whose prices are not known.*model_rates="):
        sonnet.cost_from_response(reply)
    priced = AnthropicAdapter("claude-sonnet-4-6",
                              model_rates={"anthropic/claude-made-up-9": {"input": 20, "output": 80}})
    assert priced.cost_from_response(reply) == (100 * SONNET["input"] + 10 * SONNET["output"]
                                                + 1000 * 20 + 100 * 80) / M
    with pytest.raises(ConfigError, match=r"model_rates\['claude-x'\]=.*'input'"):
        AnthropicAdapter("claude-sonnet-4-6", model_rates={"claude-x": {"output": 1}})
    with pytest.raises(ConfigError, match=r"model_rates\['claude-x'\]=3: give a dict"):
        AnthropicAdapter("claude-sonnet-4-6", model_rates={"claude-x": 3})

    searched = message({"input_tokens": 100, "output_tokens": 10,
                        "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0}},
                       model="claude-made-up-9")
    own = AnthropicAdapter("claude-made-up-9", rates={"input": 2, "output": 10})
    with pytest.raises(CostUnknown, match="no price is given for 3 web search calls to claude-made-up-9: "
                                          "add 'web_search'"):
        own.cost_from_response(searched)
    own = AnthropicAdapter("claude-made-up-9", rates={"input": 2, "output": 10, "web_search": 10})
    assert own.cost_from_response(searched) == (100 * 2 + 10 * 10) / M + Decimal("0.03")
    old = AnthropicAdapter("claude-3-haiku-20240307")  # genai-prices has no web-search price for it
    with pytest.raises(CostUnknown, match="genai-prices has no price for 3 web search calls to "
                                          "claude-3-haiku-20240307"):
        old.cost_from_response(searched.model_copy(update={"model": "claude-3-haiku-20240307"}))


def test_openai_responses_tool_calls_are_priced_per_call():
    adapter = OpenAIAdapter("gpt-5")
    data = {"id": f"resp_{next(IDS)}", "object": "response", "created_at": 1, "model": "gpt-5", "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [],
            "output": [{"type": "web_search_call", "id": f"ws{i}", "status": "completed",
                        "action": {"type": "search", "query": "loomc"}} for i in range(3)]
            + [{"type": "file_search_call", "id": f"fs{i}", "status": "completed", "queries": ["q"]} for i in range(2)],
            "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": 100, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1100}}
    tokens = (1000 * GPT5["input"] + 100 * GPT5["output"]) / M
    # Before, the five tool calls ($0.035) were left out: $0.00225 of $0.03725.
    assert adapter.cost_from_response(Response.model_validate(data)) == tokens + Decimal("0.03") + Decimal("0.005")
    assert adapter.cost_from_response(json.loads(Response.model_validate(data).model_dump_json())) \
        == Decimal("0.03725")


def test_a_chat_search_model_is_charged_the_search_it_makes_for_every_reply():
    """gpt-4o-search-preview and its kin search the web before every Chat Completions reply, billed per search
    on top of the tokens; the usage does not tell it. Their replies were priced at their tokens alone: a
    gpt-4o-mini-search-preview reply of 200 tokens in and 300 out counted $0.00021 of the $0.01021 it cost
    (genai-prices' $10 per thousand searches), and a USD cap let a loop spend about fifty times its cap."""
    tokens = (200 * Decimal("0.15") + 300 * Decimal("0.60")) / M
    usage = {"prompt_tokens": 200, "completion_tokens": 300, "total_tokens": 500}
    mini = OpenAIAdapter("gpt-4o-mini")
    for name in ("gpt-4o-mini-search-preview", "gpt-4o-mini-search-preview-2025-03-11"):
        assert mini.cost_from_response(chat(usage, model=name)) == tokens + Decimal("0.01")
        assert mini.cost_from_response(chat(usage, model=name).model_dump()) == tokens + Decimal("0.01")
    assert mini.cost_from_response(chat(usage, model="gpt-4o-mini")) == tokens  # a model that searches only if asked
    # The last chunk of a stream (stream_options={"include_usage": True}) names the model too.
    chunk = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "choices": [],
             "model": "gpt-4o-mini-search-preview", "usage": usage}
    assert mini.cost_from_response(chunk) == tokens + Decimal("0.01")
    # genai-prices lists no search price for gpt-4o-search-preview or gpt-5-search-api: their cost is unknown,
    # never their tokens alone; rates= gives it.
    with pytest.raises(loomc.CostUnknown, match="no price for 1 web search call to gpt-4o-search-preview: pass "
                                                "model_rates=.* with 'web_search' \\(dollars per thousand calls\\)"):
        OpenAIAdapter("gpt-4o").cost_from_response(chat(usage, model="gpt-4o-search-preview"))
    with pytest.raises(loomc.CostUnknown, match="and 1 web search call billed to the openai model "
                                                "'gpt-5-search-api-2025-10-14', whose prices are not known: .* "
                                                "with 'web_search' \\(dollars per thousand calls\\)"):
        OpenAIAdapter("gpt-4o").cost_from_response(chat(usage, model="gpt-5-search-api-2025-10-14"))
    own = OpenAIAdapter("gpt-4o-search-preview", rates={"input": 2.5, "output": 10, "web_search": 35})
    assert own.cost_from_response(chat(usage, model="gpt-4o-search-preview")) == \
        (200 * GPT4O["input"] + 300 * GPT4O["output"]) / M + Decimal("0.035")


def test_audio_and_image_replies_are_priced_at_their_audio_and_image_prices_never_a_silent_zero():
    """Replies of OpenAI's audio and image endpoints report their usage in shapes of their own. A transcription's
    audio tokens (input_token_details, singular) were priced as text, half what gpt-4o-transcribe bills; a
    whisper-1 transcription, whose usage counts seconds of audio and no tokens, was priced $0 under a USD cap;
    and an image reply's image tokens were priced as text, a third of what gpt-image-1.5 bills for its output."""
    from openai.types import ImagesResponse
    from openai.types.audio import Transcription
    heard = Transcription.model_validate({"text": "hello", "usage": {
        "type": "tokens", "input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100,
        "input_token_details": {"audio_tokens": 950, "text_tokens": 50}}})
    # gpt-4o-transcribe: $2.50 text in, $6 audio in, $10 out per million tokens.
    expected = (50 * Decimal("2.5") + 950 * Decimal("6") + 100 * Decimal("10")) / M
    assert OpenAIAdapter("gpt-4o-transcribe").cost_from_response(heard) == expected == Decimal("0.006825")
    assert OpenAIAdapter("gpt-4o-transcribe").cost_from_response(heard.model_dump()) == expected

    timed = Transcription.model_validate({"text": "hello", "usage": {"type": "duration", "seconds": 60}})
    whisper = OpenAIAdapter("whisper-1")
    with pytest.raises(UsageMissing, match=r"counts no tokens \(.*seconds=60.*\).*loomc.charge\(usd\)"):
        whisper.cost_from_response(timed)

    run = charged_under_a_usd_cap(lambda: whisper.charge(timed))
    assert run.status == "failed" and run.reason.startswith("UsageMissing: ") and len(run.history) == 1

    drawn = ImagesResponse.model_validate({"created": 1, "data": [{"b64_json": "aGk="}], "usage": {
        "input_tokens": 500, "output_tokens": 4160, "total_tokens": 4660,
        "input_tokens_details": {"text_tokens": 100, "image_tokens": 400},
        "output_tokens_details": {"image_tokens": 4160, "text_tokens": 0}}})
    # gpt-image-1.5: $5 text in, $8 image in, $32 image out per million tokens ($10 text out).
    image_15 = (100 * Decimal("5") + 400 * Decimal("8") + 4160 * Decimal("32")) / M
    assert OpenAIAdapter("gpt-image-1.5").cost_from_response(drawn) == image_15 == Decimal("0.13682")
    # gpt-image-1 lists no image output price of its own: its output tokens are its image tokens, at $40.
    image_1 = (100 * Decimal("5") + 400 * Decimal("10") + 4160 * Decimal("40")) / M
    assert OpenAIAdapter("gpt-image-1").cost_from_response(drawn) == image_1
    own = OpenAIAdapter("gpt-image-1.5", rates={"input": 5, "output": 10, "input_image": 8, "output_image": 32})
    assert own.cost_from_response(drawn) == image_15
    assert OpenAIAdapter("gpt-image-1.5", rates={"input": 5, "output": 10}).cost_from_response(drawn) == \
        (500 * Decimal("5") + 4160 * Decimal("10")) / M  # rates without image prices: the token prices


def test_a_usage_without_its_token_counts_is_usage_missing_not_a_silent_zero(sonnet):
    """A reply as a dict whose usage lost its counts (cut short, or a proxy's) was priced at what was left: an
    Anthropic usage of {} at $0, one of {"output_tokens": 10} at its output alone."""
    def reply(usage: dict) -> dict:
        return {"id": f"msg_{next(IDS)}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                "content": [], "stop_reason": "end_turn", "usage": usage}

    for usage, said in (({}, "empty"), ({"output_tokens": 10}, "output_tokens=10")):
        with pytest.raises(UsageMissing, match=re.escape(f"usage lacks its input or output token count ({said})")):
            sonnet.cost_from_response(reply(usage))
    assert sonnet.cost_from_response(reply({"input_tokens": 0, "output_tokens": 0})) == 0  # counted, and none
    with pytest.raises(UsageMissing, match=re.escape("usage counts no tokens (empty)")):
        OpenAIAdapter("gpt-4o").cost_from_response({"id": "chatcmpl-empty", "model": "gpt-4o", "usage": {}})


def test_a_part_without_a_price_charges_what_is_known_then_ends_a_usd_capped_run(sonnet):
    from loomc import LastGood
    def reply():
        return beta_message({"input_tokens": 1000, "output_tokens": 100, "iterations": [
            iteration("message", 1000, 100), iteration("advisor_message", 1000, 100, "claude-made-up-9")]})

    known = (1000 * SONNET["input"] + 100 * SONNET["output"]) / M
    calls: list[int] = []

    @loop(budget=Budget(usd=1.0, iterations=10), backtrack=LastGood(), checkpoint="memory")
    def capped(s):
        calls.append(s)
        sonnet.charge(reply())
        return s + 1

    run = capped.run(0)
    assert run.status == "failed" and len(calls) == 1 and run.total_cost == known
    assert run.reason.startswith("CostUnknown: ") and "a USD budget is set" in run.reason

    @loop(budget=Budget(iterations=2), checkpoint="memory")
    def uncapped(s):
        sonnet.charge(reply())
        return s + 1

    with pytest.warns(UserWarning, match="claude-made-up-9.*counted as \\$0"):
        run = uncapped.run(0)
    assert run.status == "budget_exhausted" and run.total_cost == 2 * known

    @loop(budget=Budget(usd=1.0, iterations=10), backtrack=LastGood(), cost_fn=sonnet.cost_fn, checkpoint="memory")
    def priced_after(s):
        return {"_response": reply().model_dump(), "n": s["n"] + 1}

    run = priced_after.run({"n": 0})  # the same through cost_fn: the known part is charged, then the run ends
    assert run.status == "failed" and len(run.history) == 1 and run.total_cost == known


def test_us_only_inference_costs_a_tenth_more_on_the_tokens(sonnet):
    """genai-prices does not model Anthropic's inference_geo; a reply run in the US only was
    counted at the global price, a tenth short."""
    usage = {"input_tokens": 1000, "output_tokens": 100, "inference_geo": "us",
             "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0}}
    tokens = (1000 * SONNET["input"] + 100 * SONNET["output"]) / M
    assert sonnet.cost_from_response(message(usage)) == tokens * Decimal("1.1") + Decimal("0.02")
    assert sonnet.cost_from_response(message({**usage, "inference_geo": "global"})) == tokens + Decimal("0.02")
    advised = beta_message({**usage, "iterations": [iteration("message", 1000, 100),
                                                    iteration("advisor_message", 1000, 0, "claude-opus-4-7")]})
    assert sonnet.cost_from_response(advised) == (tokens + 1000 * OPUS["input"] / M) * Decimal("1.1") + Decimal("0.02")
    exact = AnthropicAdapter("claude-sonnet-4-6", rates={"input": 3, "output": 15, "web_search": 10})
    assert exact.cost_from_response(message(usage)) == tokens + Decimal("0.02")  # explicit rates: as given


def test_openai_audio_tokens_are_priced_at_audio_prices():
    """gpt-audio bills audio at $32 in and $64 out per million tokens, against $2.50 and $10 for
    text; every prompt and completion token was priced as text."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
             "prompt_tokens_details": {"audio_tokens": 800, "cached_tokens": 0},
             "completion_tokens_details": {"audio_tokens": 400, "reasoning_tokens": 0}}
    text_in, text_out = Decimal("2.5"), Decimal("10")
    expected = (200 * text_in + 800 * Decimal("32") + 100 * text_out + 400 * Decimal("64")) / M
    audio = OpenAIAdapter("gpt-audio")
    assert audio.cost_from_response(chat(usage, model="gpt-audio")) == expected == Decimal("0.0527")
    reply = chat(usage, model="gpt-4o-audio-preview")
    from loomc import CostUnknown
    with pytest.raises(CostUnknown, match="genai-prices has no price for 800 audio input tokens and 400 audio output "
                                          "tokens to gpt-4o-audio-preview.*'input_audio'"):
        OpenAIAdapter("gpt-4o-audio-preview").cost_from_response(reply)  # genai-prices lists its text prices only
    exact = OpenAIAdapter("gpt-4o-audio-preview", rates={"input": 2.5, "output": 10, "input_audio": 40,
                                                         "output_audio": 80})
    assert exact.cost_from_response(reply) == (200 * text_in + 800 * 40 + 100 * text_out + 400 * 80) / M
    with pytest.raises(CostUnknown, match="add 'output_audio' \\(dollars per million tokens\\) to rates"):
        OpenAIAdapter("gpt-4o-audio-preview", rates={"input": 2.5, "output": 10, "input_audio": 40}
                      ).cost_from_response(reply)


def test_a_judge_cut_off_before_it_answers_ends_the_run_instead_of_paying_for_every_no():
    """A reasoning model given the default 8 tokens spends them thinking and returns no text. Each
    verdict read as a no, so the loop paid for all 20 calls its cap allowed and never converged."""
    import asyncio
    from loomc import LastGood
    calls: list[dict] = []

    def handler(request):
        body = json.loads(request.content)
        calls.append(body)
        limit = body["max_completion_tokens"]
        done = limit > 8
        data = {"id": f"chatcmpl-{next(IDS)}", "object": "chat.completion", "created": 1, "model": "gpt-5",
                "choices": [{"index": 0, "finish_reason": "stop" if done else "length",
                             "message": {"role": "assistant", "content": "Yes" if done else ""}}],
                "usage": {"prompt_tokens": 300, "completion_tokens": limit, "total_tokens": 300 + limit,
                          "completion_tokens_details": {"reasoning_tokens": limit - 1 if done else limit}}}
        return httpx2.Response(200, json=data)

    client = OpenAI(api_key="test-key", http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
                    max_retries=0)
    adapter = OpenAIAdapter("gpt-5")
    run = loop(budget=Budget(usd=1.0, iterations=20), converge_on=adapter.judge(client, "Is it done?"),
               backtrack=LastGood(), cost_fn=lambda s: 0.04, checkpoint="memory")(lambda s: s + 1).run(0)
    assert run.status == "failed" and len(calls) == 1
    assert "cut off at max_tokens=8 before it said anything" in run.reason and "max_tokens=2000" in run.reason
    assert run.total_cost == Decimal("0.04") + (300 * GPT5["input"] + 8 * GPT5["output"]) / M  # the judge's call too
    calls.clear()
    roomy = loop(budget=Budget(usd=1.0, iterations=20), checkpoint="memory",
                 converge_on=adapter.judge(client, "Is it done?", max_tokens=500))(lambda s: s + 1).run(0)
    assert roomy.status == "completed" and len(calls) == 1
    with pytest.raises(ConfigError, match="judge\\(max_tokens=0\\)"):
        adapter.judge(client, "Is it done?", max_tokens=0)

    def cut_short(request):
        data = message({"input_tokens": 200, "output_tokens": 8}, text="").model_dump()
        return httpx2.Response(200, json={**data, "content": [], "stop_reason": "max_tokens"})

    aclient = AsyncAnthropic(api_key="test-key", max_retries=0,
                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(cut_short)))

    @loop(budget=Budget(iterations=20), converge_on=AnthropicAdapter("claude-sonnet-4-6").judge(aclient, "Done?"),
          backtrack=LastGood(), checkpoint="memory")
    async def draft(state):
        return state + 1

    arun = asyncio.run(draft.run(0))
    assert arun.status == "failed" and len(arun.history) == 1 and "claude-sonnet-4-6 was cut off" in arun.reason


def test_each_serving_iteration_is_its_own_request_for_long_context_prices():
    """Claude Sonnet 4.5 doubles its input price past 200,000 input tokens in one request. Two
    server-side tool turns of 150,000 tokens each are two requests below the line, although the
    top-level counts add up to 300,000."""
    adapter = AnthropicAdapter("claude-sonnet-4-5")
    reply = beta_message({"input_tokens": 300000, "output_tokens": 0, "iterations": [
        iteration("message", 150000, 0), iteration("message", 150000, 0)]}, model="claude-sonnet-4-5")
    assert adapter.cost_from_response(reply) == 2 * 150000 * SONNET["input"] / M == Decimal("0.9")
    whole = message({"input_tokens": 300000, "output_tokens": 0}, model="claude-sonnet-4-5")
    assert adapter.cost_from_response(whole) == Decimal("1.8")


def test_an_anthropic_stream_event_is_refused_not_priced_without_its_input(sonnet):
    """The last event of a stream, message_delta, carries output_tokens but input_tokens=None: it
    was priced at $0.0018, the output alone, with the input counted as $0."""
    from anthropic.types import RawMessageDeltaEvent, RawMessageStartEvent
    delta = RawMessageDeltaEvent.model_validate({"type": "message_delta", "usage": {"output_tokens": 120},
                                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None}})
    start = RawMessageStartEvent.model_validate({"type": "message_start", "message": message(
        {"input_tokens": 5000, "output_tokens": 1}).model_dump()})
    for event in (delta, start, delta.model_dump()):
        with pytest.raises(ConfigError, match="stream event, not a whole message: .*get_final_message"):
            sonnet.cost_from_response(event)

    run = charged_under_a_usd_cap(lambda: sonnet.charge(delta))
    assert run.status == "failed" and len(run.history) == 1 and run.reason.startswith("ConfigError: this is a "
                                                                                       "message_delta stream event")


def test_a_responses_stream_is_priced_from_its_completed_event():
    from openai.types.responses import ResponseCompletedEvent, ResponseCreatedEvent
    data = response({"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": 100, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": 1100}).model_dump()
    done = ResponseCompletedEvent.model_validate({"type": "response.completed", "sequence_number": 9, "response": data})
    adapter = OpenAIAdapter("gpt-5")
    assert adapter.cost_from_response(done) == (1000 * GPT5["input"] + 100 * GPT5["output"]) / M
    created = ResponseCreatedEvent.model_validate({"type": "response.created", "sequence_number": 0,
                                                   "response": {**data, "usage": None}})
    with pytest.raises(UsageMissing, match="stream event 'response.created' has no usage.*response.completed event"):
        adapter.cost_from_response(created)


def test_a_dearer_tier_genai_prices_has_no_price_for_is_unknown_not_standard():
    """Fast mode and the priority tier cost more than the standard prices. Where genai-prices lists
    no price for the tier, it answers with the standard one; that was taken as the cost."""
    from loomc import CostUnknown
    fast = {"input_tokens": 1000, "output_tokens": 100, "speed": "fast"}
    assert AnthropicAdapter("claude-opus-5").cost_from_response(message(fast, model="claude-opus-5")) == (
        1000 * 10 + 100 * 50) / M
    with pytest.raises(CostUnknown, match="genai-prices has no speed=fast price for claude-opus-4-6.*rates="):
        AnthropicAdapter("claude-opus-4-6").cost_from_response(message(fast, model="claude-opus-4-6"))
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    assert OpenAIAdapter("gpt-4o").cost_from_response(chat(usage, tier="priority")) == (
        1000 * Decimal("4.25") + 100 * 17) / M
    with pytest.raises(CostUnknown, match="no service_tier=priority price for gpt-3.5-turbo"):
        OpenAIAdapter("gpt-3.5-turbo").cost_from_response(chat(usage, tier="priority", model="gpt-3.5-turbo"))
    assert OpenAIAdapter("gpt-3.5-turbo").cost_from_response(chat(usage, tier="flex", model="gpt-3.5-turbo")) > 0


def test_a_tier_that_is_not_known_to_bill_at_or_below_standard_is_unknown_where_genai_prices_lacks_it():
    """Regression: only flex, priority, fast and scale were passed on to genai-prices, and only priority was
    known to cost more. A reply served at `ultrafast` (a tier the Responses API reports in openai 3.x), or
    at `fast` on a model genai-prices lists no fast price for, was priced at the standard prices without a
    word: a USD cap that counted it let the loop overspend. Every tier but the standard ones is now passed on,
    and every one but flex and scale is taken as dearer: its cost is unknown where genai-prices has no price."""
    from loomc import CostUnknown
    tokens = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
              "output_tokens": 100, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1100}
    gpt5 = OpenAIAdapter("gpt-5")
    standard = gpt5.cost_from_response(response(tokens))
    assert standard == (1000 * GPT5["input"] + 100 * GPT5["output"]) / M
    assert gpt5.cost_from_response(response(tokens, tier="default")) == standard
    assert gpt5.cost_from_response(response(tokens, tier="flex")) == standard / 2
    assert gpt5.cost_from_response(response(tokens, tier="fast")) == gpt5.cost_from_response(
        response(tokens, tier="priority")) > standard  # genai-prices prices fast as priority
    with pytest.raises(CostUnknown, match=r"genai-prices has no service_tier=ultrafast price for gpt-5, only its "
                                          r"standard price, which would undercount: pass rates=\{\.\.\.\}"):
        gpt5.cost_from_response(response(tokens, tier="ultrafast"))
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    with pytest.raises(CostUnknown, match="no service_tier=fast price for gpt-3.5-turbo"):
        OpenAIAdapter("gpt-3.5-turbo").cost_from_response(chat(usage, tier="fast", model="gpt-3.5-turbo"))
    # The same for an Anthropic speed other than standard and fast (the SDK may add one): dearer, unknown.
    turbo = message({"input_tokens": 1000, "output_tokens": 100})
    turbo.usage.speed = "turbo"  # not in this SDK's Literal: set as a later SDK would parse it
    with pytest.raises(CostUnknown, match="no speed=turbo price for claude-sonnet-4-6"):
        AnthropicAdapter("claude-sonnet-4-6").cost_from_response(turbo)
    # Under a USD cap, a loop that prices such a reply stops after that paid step rather than count it short.
    reply = response(tokens, tier="ultrafast")
    run = loop(budget=Budget(usd=1), cost_fn=gpt5.cost_fn, checkpoint="memory")(
        lambda s: {"_response": reply.model_dump(), "n": s["n"] + 1}).run({"n": 0})
    assert run.status == "failed" and run.steps == 1 and "service_tier=ultrafast" in run.reason


def test_a_reply_from_another_model_than_the_adapters_is_priced_at_that_models_prices(tmp_path):
    """Regression: a reply was priced at the adapter's model whatever model served it. A loop that calls
    gpt-4o-mini, and gpt-4o once it stalls, under OpenAIAdapter("gpt-4o-mini") counted each gpt-4o call at
    a sixteenth of its price: its $1.00 cap saw $0.62 after 40 calls that cost $9.67. A reply is now priced
    at the model it names, unless that is the adapter's model by another name (a dated snapshot)."""
    from loomc import CostUnknown
    usage = {"prompt_tokens": 100_000, "completion_tokens": 1_000, "total_tokens": 101_000}
    mini_call = (100_000 * Decimal("0.15") + 1_000 * Decimal("0.60")) / M
    big_call = (100_000 * GPT4O["input"] + 1_000 * GPT4O["output"]) / M
    mini = OpenAIAdapter("gpt-4o-mini")
    assert mini.cost_from_response(chat(usage, model="gpt-4o-mini-2024-07-18")) == mini_call
    assert mini.cost_from_response(chat(usage, model="gpt-4o-2024-08-06")) == big_call
    assert OpenAIAdapter("gpt-4o").cost_from_response(chat(usage, model="gpt-4o-2024-05-13")) == (
        100_000 * 5 + 1_000 * 15) / M  # an older snapshot of the alias, at its own prices
    haiku = AnthropicAdapter("claude-haiku-4-5")
    assert haiku.cost_from_response(message({"input_tokens": 1000, "output_tokens": 100},
                                            model="claude-opus-4-1-20250805")) == (1000 * 15 + 100 * 75) / M

    db = tmp_path / "c.db"
    calls = []

    @loop(budget=Budget(usd=1.00, iterations=40), checkpoint=str(db))
    def escalating(state):
        model = "gpt-4o-2024-08-06" if state["n"] >= 3 else "gpt-4o-mini-2024-07-18"  # a stronger model after 3
        calls.append(model)
        mini.charge(chat(usage, model=model))
        return {"n": state["n"] + 1}

    run = escalating.run({"n": 0})
    paid = sum(big_call if model.startswith("gpt-4o-2") else mini_call for model in calls)
    assert run.status == "budget_exhausted" and run.total_cost == paid <= Decimal(1)
    assert len(calls) == 6  # 3 cheap calls, then 3 at $0.26: a fourth would pass the cap
    # Each call is the line item of the model that served it; the adapter's model under its own name.
    assert run.history[0].metrics["cost_items"] == {"gpt-4o-mini": str(mini_call)}
    assert run.history[3].metrics["cost_items"] == {"gpt-4o-2024-08-06": str(big_call)}

    # The adapter's model by another name: a snapshot genai-prices does not list yet is the alias called.
    gpt4o = OpenAIAdapter("gpt-4o")
    assert gpt4o.cost_from_response(chat(usage, model="gpt-4o-2031-01-01")) == big_call
    # Another model whose prices nobody knows: unknown, never the adapter's prices; model_rates prices it.
    with pytest.raises(CostUnknown, match="billed to the openai model 'gpt-9', whose prices are not known: pass "
                                          r"them, as in OpenAIAdapter\('gpt-4o', model_rates=\{'gpt-9'"):
        gpt4o.cost_from_response(chat(usage, model="gpt-9"))
    assert OpenAIAdapter("gpt-4o", model_rates={"gpt-9": {"input": 20, "output": 80}}).cost_from_response(
        chat(usage, model="gpt-9")) == (100_000 * 20 + 1_000 * 80) / M
    assert OpenAIAdapter("gpt-4o-mini", model_rates={"gpt-4o": {"input": 2, "output": 8}}).cost_from_response(
        chat(usage, model="gpt-4o-2024-08-06")) == (100_000 * 2 + 1_000 * 8) / M  # under any of its names
    # An adapter given rates for a model genai-prices does not list takes them for a name it does not list
    # either (a provider's own name for the model called), and a listed model at its listed prices.
    own = OpenAIAdapter("llama-3-70b", rates={"input": 1, "output": 2})
    assert own.cost_from_response(chat(usage, model="meta-llama/Meta-Llama-3-70B-Instruct")) == (
        100_000 * 1 + 1_000 * 2) / M
    assert own.cost_from_response(chat(usage, model="gpt-4o-2024-08-06")) == big_call
    # An embeddings reply names its model too, and is priced at it (it used to be priced as gpt-4o's input).
    from openai.types import CreateEmbeddingResponse
    embedded = CreateEmbeddingResponse.model_validate({
        "data": [{"embedding": [0.5], "index": 0, "object": "embedding"}], "model": "text-embedding-3-small",
        "object": "list", "usage": {"prompt_tokens": 100_000, "total_tokens": 100_000}})
    assert gpt4o.cost_from_response(embedded) == 100_000 * Decimal("0.02") / M
    # Rates given for a listed model stay its prices under any of its names.
    assert OpenAIAdapter("gpt-4o", rates={"input": 1, "output": 2}).cost_from_response(
        chat(usage, model="gpt-4o-2024-08-06")) == (100_000 * 1 + 1_000 * 2) / M


def test_an_adapter_or_its_charge_given_as_cost_fn_is_refused_at_decoration(sonnet):
    """cost_fn=adapter.charge was taken: each step then raised UsageMissing on the state, after its paid call."""
    with pytest.raises(ConfigError, match=r"must be a function: to price with it, pass "
                                          r"cost_fn=AnthropicAdapter\('claude-sonnet-4-6'\)\.cost_fn"):
        loop(budget=Budget(usd=1), cost_fn=sonnet, checkpoint="memory")
    for method in (sonnet.charge, sonnet.acharge):
        with pytest.raises(ConfigError, match=r"\.(a)?charge prices a response you hand it inside fn .* as cost_fn= "
                                              r"pass AnthropicAdapter\('claude-sonnet-4-6'\)\.cost_fn"):
            loop(budget=Budget(usd=1), cost_fn=method, checkpoint="memory")
    assert loop(budget=Budget(usd=1), cost_fn=sonnet.cost_fn, checkpoint="memory")(lambda s: s)


def test_an_adapter_judge_passed_uncalled_is_refused_with_the_call_to_write(sonnet):
    from loomc import PolicyTypeError
    with pytest.raises(PolicyTypeError, match=r"judge builds a policy, it is not one: call it, as in "
                                              r"adapter\.judge\(client, "):
        loop(budget=Budget(usd=1), converge_on=sonnet.judge, checkpoint="memory")


def test_image_generation_and_code_interpreter_calls_are_named_as_unpriced():
    """They bill by the image or the container, which a response does not tell: counting them as
    $0 without a word let a USD cap overspend silently."""
    from loomc import NoCostWarning
    data = {"id": f"resp_{next(IDS)}", "object": "response", "created_at": 1, "model": "gpt-5", "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [],
            "output": [{"type": "image_generation_call", "id": "ig1", "status": "completed", "result": None},
                       {"type": "code_interpreter_call", "id": "ci1", "status": "completed", "code": "1+1",
                        "container_id": "c1", "outputs": None},
                       {"type": "code_interpreter_call", "id": "ci2", "status": "completed", "code": "2+2",
                        "container_id": "c1", "outputs": None}],
            "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": 100, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1100}}
    adapter = OpenAIAdapter("gpt-5")
    with pytest.warns(NoCostWarning, match="holds 2 code_interpreter_calls and 1 image_generation_call, .* "
                                           "loomc.charge\\(usd, item='...'\\)") as caught:
        usd = adapter.cost_from_response(Response.model_validate(data))
    assert usd == (1000 * GPT5["input"] + 100 * GPT5["output"]) / M
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    # Anthropic's code execution bills the container's running time too: a reply that used it says so.
    ran = Message.model_validate({
        "id": f"msg_{next(IDS)}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
        "stop_reason": "end_turn", "stop_sequence": None, "container": {"id": "cntr_1", "expires_at": "2026-12-03T18:00:00Z"},
        "usage": {"input_tokens": 1000, "output_tokens": 100},
        "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "bash_code_execution",
                     "input": {"command": "pytest -q"}},
                    {"type": "bash_code_execution_tool_result", "tool_use_id": "srvtoolu_1",
                     "content": {"type": "bash_code_execution_result", "stdout": "1 passed", "stderr": "",
                                 "return_code": 0, "content": []}},
                    {"type": "text", "text": "The tests pass."}]})
    sonnet = AnthropicAdapter("claude-sonnet-4-6")
    with pytest.warns(NoCostWarning, match=r"holds 1 bash_code_execution_tool_result, billed by the image or the "
                                           r"container rather than in its token counts"):
        assert sonnet.cost_from_response(ran) == (1000 * SONNET["input"] + 100 * SONNET["output"]) / M
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCostWarning)
        sonnet.cost_from_response(message({"input_tokens": 10, "output_tokens": 1}))  # text alone: nothing to tell


def _listed_prices(model: str, provider: str) -> dict[str, Decimal]:
    """Dollars per million tokens that genai-prices lists for ``model`` at ``provider``, by kind (a tiered price's
    base: below its first tier)."""
    from genai_prices import Usage, calc_price
    price = calc_price(Usage(input_tokens=0, output_tokens=0), model, provider_id=provider).model_price
    listed = {kind: getattr(price, f"{kind}_mtok") or 0 for kind in ("input", "cache_read", "output")}
    return {kind: Decimal(str(getattr(value, "base", value))) for kind, value in listed.items()}


def test_an_openai_compatible_provider_is_priced_at_its_own_listed_prices():
    """A loop calling DeepSeek or Groq through the openai SDK needed rates= by hand; genai-prices lists them."""
    deepseek = OpenAIAdapter("deepseek-chat", provider="deepseek")
    assert repr(deepseek) == "OpenAIAdapter('deepseek-chat', provider='deepseek')"
    # DeepSeek tells its cache hits in a field of its own, a part of prompt_tokens.
    reply = chat({"prompt_tokens": 10_000, "completion_tokens": 2_000, "total_tokens": 12_000,
                  "prompt_cache_hit_tokens": 6_000, "prompt_cache_miss_tokens": 4_000}, model="deepseek-chat")
    p = _listed_prices("deepseek-chat", "deepseek")
    assert p["cache_read"] < p["input"]  # else this would not tell the cache hits apart
    assert deepseek.cost_from_response(reply) == (4_000 * p["input"] + 6_000 * p["cache_read"]
                                                   + 2_000 * p["output"]) / M
    groq = OpenAIAdapter("llama-3.3-70b-versatile", provider="groq")
    served = chat({"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100},
                  model="llama-3.3-70b-versatile")
    served.service_tier = "on_demand"  # Groq's own standard tier, which an OpenAI adapter took for a dearer one
    p = _listed_prices("llama-3.3-70b-versatile", "groq")
    assert groq.cost_from_response(served) == (1_000 * p["input"] + 100 * p["output"]) / M
    openai_served = chat({"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100})
    openai_served.service_tier = "on_demand"
    with pytest.raises(loomc.CostUnknown, match="service_tier=on_demand"):  # at OpenAI, an unknown tier stays unknown
        OpenAIAdapter("gpt-4o").cost_from_response(openai_served)


def test_a_provider_genai_prices_does_not_know_is_refused_when_the_adapter_is_built():
    with pytest.raises(ConfigError, match=r"genai-prices knows no provider 'deepsek' \(did you mean 'deepseek'\?\); "
                                          r"the ids it knows: .*openai.*; or pass rates="):
        OpenAIAdapter("deepseek-chat", provider="deepsek")
    with pytest.raises(ConfigError, match="give the id genai-prices knows the provider by"):
        OpenAIAdapter("deepseek-chat", provider="")
    own = OpenAIAdapter("house-model", provider="in-house", rates={"input": 1, "output": 2})  # priced by its rates
    assert own.cost_from_response(chat({"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000,
                                        "total_tokens": 2_000_000}, model="house-model")) == Decimal(3)


def test_a_judge_of_another_provider_asks_with_max_tokens_which_they_take(tmp_path):
    """DeepSeek ignores max_completion_tokens, which OpenAI's reasoning models need: each provider is asked its way."""
    asked: list[dict] = []

    def handler(request):
        asked.append(json.loads(request.content))
        return httpx2.Response(200, json=chat({"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
                                              model="deepseek-chat").model_dump())

    client = OpenAI(api_key="k", base_url="https://api.deepseek.com", max_retries=0,
                    http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    deepseek = OpenAIAdapter("deepseek-chat", provider="deepseek")
    run = loop(budget=Budget(iterations=3), converge_on=deepseek.judge(client, "Done?"), checkpoint="memory")(
        lambda s: s + 1).run(0)
    assert run.status == "completed" and asked[0]["max_tokens"] == 8 and "max_completion_tokens" not in asked[0]
    p = _listed_prices("deepseek-chat", "deepseek")
    assert run.history[0].metrics["cost_items"]["judge"] == str((100 * p["input"] + 1 * p["output"]) / M)


def test_a_claude_reply_served_by_bedrock_is_priced_at_bedrock_s_listed_prices():
    """AnthropicBedrock returns the same Message, which names the model as Anthropic does; genai-prices lists it under
    aws by Bedrock's id, at its regional price. Under the Anthropic adapter a reply of Bedrock's id was a CostUnknown,
    and one of Anthropic's name priced at Anthropic's prices, below Bedrock's."""
    model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    reply = Message.model_validate({**message({"input_tokens": 1_000, "output_tokens": 100}).model_dump(),
                                    "id": f"msg_bdrk_{next(IDS)}", "model": "claude-sonnet-4-5-20250929"})
    bedrock = AnthropicAdapter(model, provider="aws")
    assert repr(bedrock) == f"AnthropicAdapter({model!r}, provider='aws')"
    p = _listed_prices(model, "aws")
    standard = _listed_prices("claude-sonnet-4-5", "anthropic")
    assert p["input"] > standard["input"]  # Bedrock's regional endpoints cost more: this tells the two apart
    assert bedrock.cost_from_response(reply) == (1_000 * p["input"] + 100 * p["output"]) / M
    opus = Message.model_validate({**reply.model_dump(), "id": f"msg_bdrk_{next(IDS)}",
                                   "model": "claude-opus-4-1-20250805"})  # a call that asked for a stronger model
    p = _listed_prices("claude-opus-4-1-20250805", "aws")
    assert bedrock.cost_from_response(opus) == (1_000 * p["input"] + 100 * p["output"]) / M


def test_an_openrouter_reply_is_charged_what_openrouter_says_it_billed():
    """OpenRouter routes a model to providers at different prices: a reply that says what it cost (usage.cost, asked
    for with usage={"include": True}) is charged that, and a call on your own key (BYOK) what that key was billed
    too; one that does not say is priced at OpenRouter's listed prices."""
    router = OpenAIAdapter("anthropic/claude-sonnet-4.5", provider="openrouter")
    tokens = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100}
    said = chat({**tokens, "cost": 0.0123}, model="anthropic/claude-sonnet-4.5")
    assert router.cost_from_response(said) == Decimal("0.0123")
    own_key = chat({**tokens, "cost": 0.0005, "is_byok": True, "cost_details": {"upstream_inference_cost": 0.0105}},
                   model="anthropic/claude-sonnet-4.5")
    assert router.cost_from_response(own_key) == Decimal("0.0110")
    p = _listed_prices("anthropic/claude-sonnet-4.5", "openrouter")
    silent = chat(tokens, model="anthropic/claude-sonnet-4.5")
    assert router.cost_from_response(silent) == (1_000 * p["input"] + 100 * p["output"]) / M
    assert OpenAIAdapter("gpt-4o").cost_from_response(chat({**tokens, "cost": 99.0})) == (
        1_000 * GPT4O["input"] + 100 * GPT4O["output"]) / M  # only OpenRouter's word is taken
