"""Cost adapters for the Anthropic and OpenAI SDKs, priced by genai-prices (an optional extra).

    adapter = AnthropicAdapter("claude-sonnet-4-6")

    @loop(budget=Budget(usd=2.00),
          converge_on=adapter.judge(client, "Is this report ready to send? Answer yes or no.\\n\\n{state}"))
    def refine(state):
        reply = client.messages.create(model="claude-sonnet-4-6", ...)
        adapter.charge(reply)            # priced and recorded at once, even if the process dies next line
        return {"report": reply.content[0].text}

- ``charge(response)`` (``await acharge(response)`` in async code) prices a response and records
  the spend write-ahead, through ``loomc.charge``.
- ``cost_fn(state)``, for ``@loop(cost_fn=...)``, prices the response returned at
  ``state["_response"]`` (or the attribute ``_response``) instead. The response is then stored
  with the state, and comes back as a dict on resume.
- ``cost_from_response(response)`` prices any response object or dict.
- Usage is read the way each provider bills it:
  - Anthropic's ``input_tokens`` excludes cache reads and writes, which are added to it;
    5-minute and 1-hour cache writes are priced apart.
  - OpenAI's cached tokens are a subset of the prompt or input tokens.
  - Thinking and reasoning tokens are already in the output count and are never added twice.
- The service tier (flex, priority, fast) and batch pricing are honoured where the response
  says so; pass ``batch=True`` for results of the OpenAI Batch API, whose responses do not.
- Money stays ``Decimal`` from the price to the ledger.
- A model genai-prices does not know is refused when the adapter is built, unless you pass
  explicit ``rates`` (dollars per million tokens).
- A response without usage raises :class:`UsageMissing` when a USD budget applies: never a
  silent zero that would let the budget overspend.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from loomc.detectors import Judge, judge
from loomc.errors import ConfigError, CostUnknown, LoomcError
from loomc.history import to_decimal

MILLION = Decimal(1_000_000)
RATE_KEYS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")


class UsageMissing(CostUnknown):
    """A response carried no token usage, so its cost is unknown."""


@dataclass(frozen=True)
class TokenUsage:
    """Token counts normalised across providers.

    ``input`` counts every input token, cached ones included; ``cache_read`` and the
    cache writes are parts of it. ``reasoning`` is a part of ``output``.
    """

    input: int
    output: int
    cache_read: int = 0
    cache_write: int = 0
    cache_write_5m: int | None = None
    cache_write_1h: int | None = None
    reasoning: int = 0
    context: tuple[tuple[str, str], ...] = ()  # genai-prices price_context: tier, batch, speed

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cache_read, self.cache_write, self.reasoning) < 0:
            raise ValueError(f"negative token counts in {self}")
        if self.cache_read + self.cache_write > self.input:
            raise ValueError(f"cache reads and writes ({self.cache_read} + {self.cache_write}) exceed the "
                             f"{self.input} input tokens")
        if self.reasoning > self.output:
            raise ValueError(f"{self.reasoning} reasoning tokens exceed the {self.output} output tokens")


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _n(value: Any) -> int:
    return int(value or 0)


def anthropic_usage(response: Any) -> TokenUsage:
    """TokenUsage of an Anthropic ``Message`` (an SDK object or its dict)."""
    usage = _get(response, "usage")
    if usage is None:
        raise UsageMissing("the Anthropic response has no usage")
    written, read = _n(_get(usage, "cache_creation_input_tokens")), _n(_get(usage, "cache_read_input_tokens"))
    split = _get(usage, "cache_creation")
    five = _get(split, "ephemeral_5m_input_tokens")
    hour = _get(split, "ephemeral_1h_input_tokens")
    context = []
    if _get(usage, "service_tier") == "batch":
        context.append(("processing", "batch"))
    if _get(usage, "speed") == "fast":
        context.append(("speed", "fast"))
    return TokenUsage(input=_n(_get(usage, "input_tokens")) + written + read, output=_n(_get(usage, "output_tokens")),
                      cache_read=read, cache_write=written,
                      cache_write_5m=None if split is None else _n(five),
                      cache_write_1h=None if split is None else _n(hour),
                      reasoning=_n(_get(_get(usage, "output_tokens_details"), "thinking_tokens")),
                      context=tuple(context))


def openai_usage(response: Any) -> TokenUsage:
    """TokenUsage of an OpenAI ``ChatCompletion`` or Responses-API ``Response`` (object or dict)."""
    usage = _get(response, "usage")
    if usage is None:
        raise UsageMissing("the OpenAI response has no usage (for a stream, ask for "
                           "stream_options={'include_usage': True} and price the last chunk)")
    tier = _get(response, "service_tier")
    context = (("service_tier", tier),) if tier in ("flex", "priority", "fast", "scale") else ()
    if _get(usage, "prompt_tokens") is not None:  # Chat Completions
        details, out = _get(usage, "prompt_tokens_details"), _get(usage, "completion_tokens_details")
        return TokenUsage(input=_n(_get(usage, "prompt_tokens")), output=_n(_get(usage, "completion_tokens")),
                          cache_read=_n(_get(details, "cached_tokens")),
                          cache_write=_n(_get(details, "cache_write_tokens")),
                          reasoning=_n(_get(out, "reasoning_tokens")), context=context)
    details, out = _get(usage, "input_tokens_details"), _get(usage, "output_tokens_details")
    return TokenUsage(input=_n(_get(usage, "input_tokens")), output=_n(_get(usage, "output_tokens")),
                      cache_read=_n(_get(details, "cached_tokens")),
                      cache_write=_n(_get(details, "cache_write_tokens")),
                      reasoning=_n(_get(out, "reasoning_tokens")), context=context)


class _Adapter:
    provider = ""

    def __init__(self, model: str, *, rates: Mapping[str, float | str | Decimal] | None = None,
                 batch: bool = False) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{type(self).__name__}(model={model!r}): give the model name you call")
        self.model = model.split("/", 1)[1] if model.startswith(f"{self.provider}/") else model
        self.batch = batch
        self.rates = None if rates is None else _rates(rates)
        if self.rates is None:
            self._check_known()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}{', rates=...' if self.rates else ''})"

    def usage(self, response: Any) -> TokenUsage:
        raise NotImplementedError

    def _check_known(self) -> None:
        prices = _genai_prices()
        try:
            prices.calc_price(prices.Usage(input_tokens=0, output_tokens=0), self.model, provider_id=self.provider)
        except LookupError:
            raise ConfigError(
                f"genai-prices does not know the {self.provider} model {self.model!r}; pass its prices in dollars "
                f"per million tokens: {type(self).__name__}({self.model!r}, rates={{'input': 3.0, 'output': 15.0, "
                "'cache_read': 0.3, 'cache_write': 3.75}})") from None

    def cost_from_usage(self, usage: TokenUsage) -> Decimal:
        """Dollars for ``usage`` at this model's prices, exactly."""
        context = dict(usage.context)
        if self.batch:
            context["processing"] = "batch"
        if self.rates is not None:
            return _price_with_rates(usage, self.rates)
        prices = _genai_prices()
        counts: dict[str, int] = {"input_tokens": usage.input, "output_tokens": usage.output}
        if usage.cache_read:
            counts["cache_read_tokens"] = usage.cache_read
        if usage.cache_write:
            counts["cache_write_tokens"] = usage.cache_write
            if usage.cache_write_5m:
                counts["cache_write_5m_tokens"] = usage.cache_write_5m
            if usage.cache_write_1h:
                counts["cache_write_1h_tokens"] = usage.cache_write_1h
        if usage.reasoning:
            counts["output_reasoning_tokens"] = usage.reasoning
        price = prices.calc_price(prices.Usage(**counts), self.model, provider_id=self.provider,
                                  price_context=context or None)
        return to_decimal(price.total_price, "price")

    def cost_from_response(self, response: Any) -> Decimal:
        """Dollars that ``response`` cost. Raises UsageMissing if it has no usage."""
        return self.cost_from_usage(self.usage(response))

    def charge(self, response: Any, item: str | None = None) -> Decimal:
        """Price ``response`` and record the spend at once (``loomc.charge``), inside an iteration.

        Call it right after the paid call: the spend is counted even if the process dies on the
        next line, and the state need not carry the response. Returns the dollars charged.
        """
        from loomc.interpreter import charge
        usd = self._billed(response)
        charge(usd, item=item)
        return usd

    async def acharge(self, response: Any, item: str | None = None) -> Decimal:
        """:meth:`charge` for async iterations: ``await adapter.acharge(reply)``."""
        from loomc.interpreter import acharge
        usd = self._billed(response)
        await acharge(usd, item=item)
        return usd

    def cost_fn(self, state: Any) -> Decimal:
        """``@loop(cost_fn=adapter.cost_fn)``: price the response kept on the state as ``_response``."""
        response = state.get("_response") if isinstance(state, Mapping) else getattr(state, "_response", None)
        if response is None:
            raise UsageMissing(f"{self!r}.cost_fn found no response on the state: return the SDK response "
                               "as state['_response'] (or the attribute _response)")
        return self._billed(response)

    def _billed(self, response: Any) -> Decimal:
        """What ``response`` cost; a response without usage is an error under a USD cap, else $0 and a warning."""
        try:
            return self.cost_from_response(response)
        except UsageMissing as e:
            if _usd_capped():
                raise UsageMissing(f"{e}; a USD budget is set, so loomc will not count this call as $0") from None
            warnings.warn(f"loomc: {e}; counted as $0 (no USD budget is set)", stacklevel=3)  # the caller's caller
            return Decimal(0)

    def judge(self, client: Any, prompt: str, *, max_tokens: int = 8, name: str = "judge") -> Judge:
        """A ``judge`` detector that asks this model, through ``client``, whether the state is done.

        ``prompt`` may contain ``{state}``; it should ask for a yes or a no. Each judge
        call is priced and charged to the step as its own line item (``"judge"``).
        Works with sync and async clients.
        """
        if "{state}" not in prompt:
            prompt = prompt.rstrip() + "\n\n{state}"

        def ask(state: Any) -> Any:
            reply = self._ask(client, prompt.replace("{state}", str(state)), max_tokens)
            if inspect.isawaitable(reply):
                return self._settle_later(reply, name)
            return self._settle(reply, name)

        ask.__name__ = f"{type(self).__name__}({self.model!r}).judge"
        return judge(ask, name=name)

    def _settle(self, reply: Any, item: str) -> str:
        self.charge(reply, item)
        return self._text(reply)

    async def _settle_later(self, reply: Any, item: str) -> str:
        reply = await reply
        await self.acharge(reply, item)
        return self._text(reply)

    def _ask(self, client: Any, text: str, max_tokens: int) -> Any:
        raise NotImplementedError

    def _text(self, reply: Any) -> str:
        raise NotImplementedError


class AnthropicAdapter(_Adapter):
    """Prices Anthropic ``Message`` responses; ``judge`` asks through ``client.messages.create``."""

    provider = "anthropic"

    def usage(self, response: Any) -> TokenUsage:
        return anthropic_usage(response)

    def _ask(self, client: Any, text: str, max_tokens: int) -> Any:
        return client.messages.create(model=self.model, max_tokens=max_tokens,
                                      messages=[{"role": "user", "content": text}])

    def _text(self, reply: Any) -> str:
        return "".join(_get(block, "text") or "" for block in (_get(reply, "content") or ())
                       if _get(block, "type") == "text")


class OpenAIAdapter(_Adapter):
    """Prices ``ChatCompletion`` and Responses-API ``Response``; ``judge`` uses chat completions."""

    provider = "openai"

    def usage(self, response: Any) -> TokenUsage:
        return openai_usage(response)

    def _ask(self, client: Any, text: str, max_tokens: int) -> Any:
        return client.chat.completions.create(model=self.model, max_completion_tokens=max_tokens,
                                              messages=[{"role": "user", "content": text}])

    def _text(self, reply: Any) -> str:
        choices = _get(reply, "choices") or []
        return str(_get(_get(choices[0], "message"), "content") or "") if choices else ""


def _rates(rates: Mapping[str, Any]) -> dict[str, Decimal]:
    unknown = set(rates) - set(RATE_KEYS)
    if unknown or "input" not in rates or "output" not in rates:
        raise ConfigError(f"rates={dict(rates)!r}: give dollars per million tokens for 'input' and 'output', "
                          f"and optionally {', '.join(repr(k) for k in RATE_KEYS[2:])}")
    try:
        out = {k: to_decimal(v, f"rates[{k!r}]") for k, v in rates.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    out.setdefault("cache_read", out["input"])
    out.setdefault("cache_write", out["input"])
    out.setdefault("cache_write_1h", out["cache_write"])
    return out


def _price_with_rates(u: TokenUsage, r: dict[str, Decimal]) -> Decimal:
    hour = u.cache_write_1h or 0
    five = u.cache_write - hour
    uncached = u.input - u.cache_read - u.cache_write
    total = (uncached * r["input"] + u.cache_read * r["cache_read"] + five * r["cache_write"]
             + hour * r["cache_write_1h"] + u.output * r["output"])
    return total / MILLION


def _genai_prices() -> Any:
    try:
        import genai_prices
    except ImportError:
        raise ConfigError('pricing by model name needs genai-prices: pip install "loomc[adapters]", '
                          "or pass rates={...} in dollars per million tokens") from None
    return genai_prices


def _usd_capped() -> bool:
    from loomc.interpreter import current_run
    run = current_run()
    return run is not None and run.usd_room() is not None
