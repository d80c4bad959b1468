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
  - OpenAI's audio tokens are a part of the prompt and completion tokens, at audio prices; a
    transcription's audio tokens too, and an image reply's image tokens at the model's image prices.
- The service tier (flex, priority, fast) and batch pricing are honoured where the response
  says so; pass ``batch=True`` for results of the OpenAI Batch API, whose responses do not. A
  dearer tier genai-prices has no price for (``ultrafast``, or one the SDK adds later) is a
  :class:`~loomc.CostUnknown`, never the standard price.
- A reply is priced at the model that served it, as it names it (a call may ask for a stronger model
  than the adapter's), unless that is the adapter's model by another name: a dated snapshot of it.
- Money stays ``Decimal`` from the price to the ledger.
- A model genai-prices does not know is refused when the adapter is built, unless you pass
  explicit ``rates`` (dollars per million tokens; tool calls per thousand). Other models a
  response bills (an advisor, a fallback) can be given ``model_rates={name: rates}``.
- Paid tool calls are priced too: Anthropic's web searches (``server_tool_use``), the
  Responses API's ``web_search_call`` and ``file_search_call`` output items, and the search that
  a Chat Completions search model (``gpt-4o-search-preview``, ``gpt-5-search-api``) makes for
  every reply.
- An Anthropic response with ``usage.iterations`` (compaction, an advisor, a fallback model) is
  priced iteration by iteration, each at its own model's prices: compaction and advisor tokens
  are not in the top-level counts.
- A response without usage raises :class:`UsageMissing` when a USD budget applies, and any other
  part whose price is unknown raises :class:`~loomc.CostUnknown`: never a silent zero that would
  let the budget overspend.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from loomc.context import charge, current_run, named, spent, write_ahead
from loomc.detectors import Judge, judge
from loomc.budget import NoCostWarning
from loomc.errors import ConfigError, CostUnknown, LoomcError, counted, warn_at_caller
from loomc.history import to_decimal
from loomc.policy import builds_policy

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)
TOKEN_RATES = ("input", "output", "cache_read", "cache_write", "cache_write_1h")  # dollars per million tokens
# Parts of a usage with prices of their own: genai-prices' count and price fields, the unit a rate
# is given in, and what one of them is called.
_PARTS = {"input_audio": ("input_audio_tokens", "input_audio_mtok", MILLION, "audio input token"),
          "output_audio": ("output_audio_tokens", "output_audio_mtok", MILLION, "audio output token"),
          "web_search": ("web_searches", "web_searches_kcount", THOUSAND, "web search call"),
          "file_search": ("storage_searches", "storage_searches_kcount", THOUSAND, "file search call")}
CALL_RATES = tuple(kind for kind, part in _PARTS.items() if part[2] is THOUSAND)  # dollars per thousand tool calls
# Image tokens (an images.generate or images.edit reply) at the model's image prices, dollars per million tokens.
# A model with no price of its own for them bills them as tokens (gpt-image-1's output), so none is no unknown.
IMAGE_RATES = ("input_image", "output_image")
RATE_KEYS = TOKEN_RATES + tuple(_PARTS) + IMAGE_RATES
# Responses-API output items and Anthropic content blocks billed outside the token counts (by the image, or by
# the container's running time), in ways a response does not tell.
_UNPRICED_ITEMS = ("image_generation_call", "code_interpreter_call", "code_execution_tool_result",
                   "bash_code_execution_tool_result", "text_editor_code_execution_tool_result")
# What a reply reports for the standard service tier or speed (or leaves out): no price context.
_STANDARD = (None, "auto", "default", "standard")
# What a reply may report that bills at or below the standard prices. Where genai-prices has no price for the
# tier it answers with the standard one, which cannot undercount these; every other tier (priority, fast,
# ultrafast, one the SDK adds later) costs more, and its cost is unknown then.
_NOT_DEARER = {("service_tier", "flex"), ("service_tier", "scale"), ("processing", "batch")}
# Chat Completions models that search the web before every reply, billed per search on top of the tokens, which
# the usage does not tell: gpt-4o-search-preview, gpt-4o-mini-search-preview-2025-03-11, gpt-5-search-api.
_SEARCH_MODEL = re.compile(r"-search-(?:preview|api)(?:-|$)")


class UsageMissing(CostUnknown):
    """A response carried no token usage, so its cost is unknown."""


class AlreadyPricedWarning(UserWarning):
    """A response this run had priced already was priced again (the same id): it is counted once."""


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
    input_audio: int = 0  # parts of input and output, at audio prices
    output_audio: int = 0
    input_image: int = 0  # parts of input and output, at image prices where the model has them
    output_image: int = 0
    web_search: int = 0  # paid tool calls, priced per call
    file_search: int = 0
    inference_geo: str | None = None  # Anthropic's US-only inference ("us") costs 1.1 times the token prices

    def parts(self) -> dict[str, int]:
        """The counts with prices of their own (audio tokens, tool calls), by kind, where not zero."""
        return {kind: n for kind in _PARTS if (n := getattr(self, kind))}

    def __post_init__(self) -> None:
        if min(self.input, self.output, self.cache_read, self.cache_write, self.reasoning, self.input_image,
               self.output_image, *self.parts().values()) < 0:
            raise ValueError(f"negative token counts in {self}")
        if self.cache_read + self.cache_write > self.input:
            raise ValueError(f"cache reads and writes ({self.cache_read} + {self.cache_write}) exceed the "
                             f"{self.input} input tokens")
        if max(self.reasoning, self.output_audio + self.output_image) > self.output:
            raise ValueError(f"{self.reasoning} reasoning, or {self.output_audio} audio and {self.output_image} "
                             f"image tokens, exceed the {self.output} output tokens")
        if self.input_audio + self.input_image > self.input:
            raise ValueError(f"{self.input_audio} audio and {self.input_image} image tokens exceed the "
                             f"{self.input} input tokens")


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _n(value: Any) -> int:
    return int(value or 0)


def _anthropic_tokens(usage: Any, **request: Any) -> TokenUsage:
    """TokenUsage of an Anthropic usage block, the top-level one or one entry of ``usage.iterations``;
    ``request`` gives what the request as a whole reports (tier, inference geography, web searches)."""
    written, read = _n(_get(usage, "cache_creation_input_tokens")), _n(_get(usage, "cache_read_input_tokens"))
    split = _get(usage, "cache_creation")
    return TokenUsage(input=_n(_get(usage, "input_tokens")) + written + read, output=_n(_get(usage, "output_tokens")),
                      cache_read=read, cache_write=written,
                      cache_write_5m=None if split is None else _n(_get(split, "ephemeral_5m_input_tokens")),
                      cache_write_1h=None if split is None else _n(_get(split, "ephemeral_1h_input_tokens")),
                      reasoning=_n(_get(_get(usage, "output_tokens_details"), "thinking_tokens")), **request)


def _anthropic_usage_block(response: Any) -> Any:
    kind = _get(response, "type")
    if isinstance(kind, str) and kind.startswith(("message_", "content_block_")):
        # A stream event: message_delta's usage leaves the input tokens out (None), message_start's
        # counts one output token; neither is what the call cost.
        raise ConfigError(f"this is a {kind} stream event, not a whole message: price the message the "
                          "stream ends with, stream.get_final_message()")
    usage = _get(response, "usage")
    if usage is None:
        raise UsageMissing("the Anthropic response has no usage")
    if _get(usage, "input_tokens") is None or _get(usage, "output_tokens") is None:  # a dict cut short, a proxy's
        raise UsageMissing(f"the Anthropic response's usage lacks its input or output token count "
                           f"({_usage_text(usage) or 'empty'}), so loomc cannot price it")
    return usage


def anthropic_usage(response: Any) -> TokenUsage:
    """TokenUsage of an Anthropic ``Message`` (an SDK object or its dict), from its top-level counts.

    ``AnthropicAdapter`` also prices ``usage.iterations`` (compaction, advisor and fallback
    iterations), which these counts leave out or price at another model.
    """
    return _anthropic_top(_anthropic_usage_block(response))


def _anthropic_top(usage: Any) -> TokenUsage:
    context = []
    if _get(usage, "service_tier") == "batch":
        context.append(("processing", "batch"))
    speed = _get(usage, "speed")
    if speed not in _STANDARD:  # fast mode, or a faster one the SDK reports later: dearer
        context.append(("speed", str(speed)))
    return _anthropic_tokens(usage, context=tuple(context), inference_geo=_get(usage, "inference_geo"),
                             web_search=_n(_get(_get(usage, "server_tool_use"), "web_search_requests")))


def openai_usage(response: Any) -> TokenUsage:
    """TokenUsage of an OpenAI ``ChatCompletion`` or Responses-API ``Response`` (object or dict).

    The Responses API's ``web_search_call`` and ``file_search_call`` output items are counted as
    paid tool calls, and so is the web search a Chat Completions search model makes for every reply.
    """
    kind = _get(response, "type")
    if isinstance(kind, str) and kind.startswith("response.") and _get(response, "response") is not None:
        response = _get(response, "response")  # a Responses stream event: response.completed holds the whole reply
    usage = _get(response, "usage")
    if usage is None:
        raise UsageMissing(f"the OpenAI {'stream event ' + repr(kind) if kind else 'response'} has no usage (for a "
                           "Chat Completions stream, ask for stream_options={'include_usage': True} and price the "
                           "last chunk; for a Responses stream, price the response.completed event)")
    tier = _get(response, "service_tier")
    context = () if tier in _STANDARD else (("service_tier", str(tier)),)
    if _get(usage, "prompt_tokens") is not None:  # Chat Completions
        details, out = _get(usage, "prompt_tokens_details"), _get(usage, "completion_tokens_details")
        model = _get(response, "model")
        # DeepSeek tells its cache hits in a field of its own (a part of prompt_tokens too).
        return TokenUsage(input=_n(_get(usage, "prompt_tokens")), output=_n(_get(usage, "completion_tokens")),
                          cache_read=_n(_get(details, "cached_tokens")) or _n(_get(usage, "prompt_cache_hit_tokens")),
                          cache_write=_n(_get(details, "cache_write_tokens")),
                          reasoning=_n(_get(out, "reasoning_tokens")), context=context,
                          input_audio=_n(_get(details, "audio_tokens")), output_audio=_n(_get(out, "audio_tokens")),
                          web_search=int(isinstance(model, str) and _SEARCH_MODEL.search(model) is not None))
    if _get(usage, "input_tokens") is None:  # no token counts: audio billed by its length (whisper-1), say
        raise UsageMissing(f"the OpenAI response's usage counts no tokens ({_usage_text(usage) or 'empty'}), so "
                           "loomc cannot price it: record what it cost with loomc.charge(usd) (whisper-1 bills its "
                           "audio by the minute)")
    # The Responses API's details, an images reply's (image tokens), or a transcription's (input_token_details,
    # with its audio tokens).
    details = _get(usage, "input_tokens_details") or _get(usage, "input_token_details")
    out = _get(usage, "output_tokens_details")
    kinds = [_get(item, "type") for item in _get(response, "output") or ()]
    return TokenUsage(input=_n(_get(usage, "input_tokens")), output=_n(_get(usage, "output_tokens")),
                      cache_read=_n(_get(details, "cached_tokens")),
                      cache_write=_n(_get(details, "cache_write_tokens")),
                      reasoning=_n(_get(out, "reasoning_tokens")), context=context,
                      input_audio=_n(_get(details, "audio_tokens")),
                      input_image=_n(_get(details, "image_tokens")), output_image=_n(_get(out, "image_tokens")),
                      web_search=kinds.count("web_search_call"), file_search=kinds.count("file_search_call"))


def _usage_text(usage: Any) -> str:
    """A usage block's fields, short, for an error: ``type='duration', seconds=60``."""
    fields = usage if isinstance(usage, Mapping) else getattr(usage, "__dict__", {})
    return ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None and not k.startswith("_"))[:200]


Line = tuple[str, TokenUsage]  # a model and the usage billed at its prices
# The kinds of an Anthropic reply's usage.iterations that served the reply (the others: compaction, advisor).
_SERVING = ("message", "fallback_message")
Priced = tuple[Decimal, CostUnknown | None]  # the dollars known, and what could not be priced
# And the input and output tokens, and the model the reply was billed to (its line item).
Billed = tuple[Decimal, CostUnknown | None, tuple[int, int] | None, str]
# A dated snapshot of a model, as a reply names the model a call asked for by its alias: gpt-4o-2024-08-06,
# claude-sonnet-4-5-20250929.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")


class _Adapter:
    provider = ""
    # What the tokens cost, as a multiple of genai-prices' prices, by the inference geography the
    # response reports (genai-prices does not model it).
    geo_multipliers: Mapping[str, Decimal] = {}

    def __init__(self, model: str, *, provider: str | None = None,
                 rates: Mapping[str, float | str | Decimal] | None = None, batch: bool = False,
                 model_rates: Mapping[str, Mapping[str, float | str | Decimal]] | None = None) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{type(self).__name__}(model={model!r}): give the model name you call")
        if provider is not None and provider != type(self).provider:  # another that serves the same API
            if not isinstance(provider, str) or not provider:
                raise ConfigError(f"{type(self).__name__}(provider={provider!r}): give the id genai-prices knows "
                                  "the provider by, as in provider='deepseek'")
            if rates is None:
                _check_provider(provider)
            self.provider = provider
        self.model = self._name(model)
        self.batch = batch
        self.rates = None if rates is None else _rates(rates)
        self.model_rates = {self._name(name): _rates(r, f"model_rates[{name!r}]")
                            for name, r in (model_rates or {}).items()}
        if self.rates is None:
            self._check_known()

    def _name(self, model: str) -> str:
        return model.split("/", 1)[1] if model.startswith(f"{self.provider}/") else model

    def __repr__(self) -> str:
        provider = "" if self.provider == type(self).provider else f", provider={self.provider!r}"
        return f"{type(self).__name__}({self.model!r}{provider}{', rates=...' if self.rates else ''})"

    def usage(self, response: Any) -> TokenUsage:
        raise NotImplementedError

    def _check_known(self) -> None:
        if _listed(self.provider, self.model) is None:
            raise ConfigError(
                f"genai-prices does not know the {self.provider} model {self.model!r}; pass its prices in dollars "
                f"per million tokens: {type(self).__name__}({self.model!r}, rates={{'input': 3.0, 'output': 15.0, "
                "'cache_read': 0.3, 'cache_write': 3.75}})")

    def _billed_to(self, response: Any) -> str:
        """The model a reply was billed to: the one it names, unless that is this adapter's model by another name.

        A call may ask for another model than the adapter's (a stronger one once the loop stalls, say), and a
        reply names the model that served it, so pricing it at the adapter's model could undercount many times
        over. The same model by another name is this adapter's: a dated snapshot that genai-prices lists under
        the same model, or does not list yet; and, for an adapter given ``rates``, a name genai-prices does not
        list (a provider's own name for the model). A model given ``model_rates`` under another of its names
        is priced by them.
        """
        name = _get(response, "model")
        if name is None:  # a Responses stream event: response.completed holds the whole reply
            name = _get(_get(response, "response"), "model")
        if not isinstance(name, str) or not name:
            return self.model
        name = self._name(name)
        if name == self.model or name in self.model_rates:
            return name
        try:
            listed = _listed(self.provider, name)
        except ConfigError:  # genai-prices is not installed: this adapter prices by its rates alone
            listed = None
        if listed is None:
            snapshot = _SNAPSHOT.search(name)
            if self.rates is not None or (snapshot is not None and name[:snapshot.start()] == self.model):
                return self.model
            return name
        if listed == _listed(self.provider, self.model):
            return self.model
        return next((other for other in self.model_rates if _listed(self.provider, other) == listed), name)

    def cost_from_usage(self, usage: TokenUsage, model: str | None = None) -> Decimal:
        """Dollars for ``usage`` at the prices of ``model`` (this adapter's model by default), exactly.

        Raises :class:`~loomc.CostUnknown` if a part of it has no known price.
        """
        return _known(self._price(self.model if model is None else self._name(model), usage))

    def cost_from_response(self, response: Any) -> Decimal:
        """Dollars that ``response`` cost. Raises UsageMissing if it has no usage, CostUnknown if a
        part of it has no known price."""
        return _known(self._priced(response))

    def _priced(self, response: Any) -> Priced:
        reply, batched = _batch_result(response)
        return self._priced_reply(reply, batched, self._billed_to(reply))

    def _warn_unpriced(self, parts: Any) -> None:
        """A NoCostWarning for the parts of a reply (content blocks, output items) billed outside its token
        counts: an image generated, a code container's running time."""
        kinds = [_get(part, "type") for part in parts or ()]
        unpriced = sorted({kind for kind in kinds if kind in _UNPRICED_ITEMS})
        if unpriced:
            warn_at_caller(f"loomc: this response holds {' and '.join(counted(kinds.count(k), k) for k in unpriced)}, "
                           f"billed by the image or the container rather than in its token counts, which {self!r} "
                           "cannot price: record that spend with loomc.charge(usd, item='...')", NoCostWarning)

    def _priced_reply(self, response: Any, batched: bool, model: str) -> Priced:
        """What a reply billed to ``model`` cost; ``batched`` when it came as one result of a batch API (at batch
        prices)."""
        return self._price_lines([(model, _at_batch_prices(self.usage(response), batched))])

    def _price_lines(self, lines: list[Line]) -> Priced:
        priced = [self._price(model, usage) for model, usage in lines]
        return sum((usd for usd, _ in priced), Decimal(0)), _together(problem for _, problem in priced)

    def _price(self, model: str, usage: TokenUsage) -> Priced:
        """What ``usage`` cost at ``model``'s prices, and what of it has no known price."""
        rates = self.rates if model == self.model else self.model_rates.get(model)
        if rates is not None:
            usd = _price_with_rates(usage, rates)
            missing = [kind for kind in usage.parts() if kind not in rates]
            return usd, (CostUnknown(f"no price is given for {_parts_text(usage, missing)} to {model}: add "
                                     f"{_rate_keys_text(missing)} to "
                                     f"{'rates' if model == self.model else f'model_rates[{model!r}]'}")
                         if missing else None)
        return self._price_listed(model, usage)

    def _price_listed(self, model: str, usage: TokenUsage) -> Priced:
        """What ``usage`` cost at the prices genai-prices lists for ``model``, and what it lists no price for."""
        context = dict(usage.context, **({"processing": "batch"} if self.batch else {}))
        try:
            prices = _genai_prices()
            counts = prices.Usage(**_counts(usage))
            price = prices.calc_price(counts, model, provider_id=self.provider, price_context=context or None)
            # A dearer tier genai-prices has no price for comes back at the standard price: that is no price.
            dearer = [f"{k}={v}" for k, v in context.items() if (k, v) not in _NOT_DEARER]
            unpriced_tier = bool(dearer) and bool(usage.input or usage.output) and price.total_price == (
                prices.calc_price(counts, model, provider_id=self.provider).total_price)
        except (ConfigError, LookupError):
            return Decimal(0), CostUnknown(
                f"{_tokens_text(usage)} billed to the {self.provider} model {model!r}, whose prices are not known: "
                f"pass them, as in {type(self).__name__}({self.model!r}, model_rates={{{model!r}: "
                "{'input': 5.0, 'output': 25.0}}) in dollars per million tokens"
                + (f", with {_rate_keys_text(list(usage.parts()))}" if usage.parts() else ""))
        usd = to_decimal(price.total_price, "price")
        missing = [kind for kind in usage.parts() if getattr(price.model_price, _PARTS[kind][1], None) is None]
        geo = self.geo_multipliers.get(usage.inference_geo or "")
        if geo is not None:  # on the tokens, not on the tool calls
            calls = sum((n * to_decimal(getattr(price.model_price, _PARTS[kind][1]), "price") / THOUSAND
                         for kind, n in usage.parts().items() if kind in CALL_RATES and kind not in missing),
                        Decimal(0))
            usd = (usd - calls) * geo + calls
        keyword = "rates={...}" if model == self.model else f"model_rates={{{model!r}: {{...}}}}"
        return usd, _together((
            CostUnknown(f"genai-prices has no price for {_parts_text(usage, missing)} to {model}: pass "
                        f"{keyword} with {_rate_keys_text(missing)}, and the token prices") if missing else None,
            CostUnknown(f"genai-prices has no {' '.join(dearer)} price for {model}, only its standard price, which "
                        f"would undercount: pass {keyword} with the prices of that tier") if unpriced_tier else None))

    def charge(self, response: Any, item: str | None = None) -> Decimal:
        """Price ``response`` and record the spend at once (``loomc.charge``), inside an iteration.

        Call it right after the paid call: the spend is counted even if the process dies on the
        next line, and the state need not carry the response. Returns the dollars charged. It is
        the step's line item ``item``, by default the model that served the reply (``step.metrics["cost_items"]``).
        """
        usd, problem, tokens, model = self._billed(response)
        if usd or problem is None:
            charge(usd, item=model if item is None else item, tokens=tokens)
        if problem is not None:
            raise problem
        return usd

    def acharge(self, response: Any, item: str | None = None) -> Coroutine[Any, Any, Decimal]:
        """:meth:`charge` for async iterations: ``await adapter.acharge(reply)``.

        The response is priced, and its spend joins the step, the moment this is called: an
        ``await`` forgotten loses the write-ahead to the store, never the money.
        """
        usd, problem, tokens, model = self._billed(response)
        counted = (spent("acharge", usd, model if item is None else item, tokens) if usd or problem is None
                   else None)
        return named(_written(counted, usd, problem), f"{type(self).__name__}.acharge")

    def cost_fn(self, state: Any) -> Decimal:
        """``@loop(cost_fn=adapter.cost_fn)``: price the response kept on the state as ``_response``."""
        response = state.get("_response") if isinstance(state, Mapping) else getattr(state, "_response", None)
        if response is None:
            raise UsageMissing(f"{self!r}.cost_fn found no response on the state: return the SDK response "
                               "as state['_response'] (or the attribute _response)")
        usd, problem, tokens, model = self._billed(response)
        if problem is not None:
            if usd:  # the part that is known still counts: the step fails with it charged
                charge(usd, item=model, tokens=tokens)
            raise problem
        run = current_run()
        if run is not None and run.in_flight >= 0 and (usd or tokens):
            run.itemise(usd, model, tokens)  # the step's line item and tokens, as charge(reply) tells them
        return usd

    def _billed(self, response: Any) -> Billed:
        """What ``response`` cost, its tokens, and the model it was billed to. A part whose price is unknown is
        an error under a USD cap (returned, with the dollars that are known); without one it is counted as $0,
        with a warning. A response the run has priced already is counted once (and its tokens not at all)."""
        tokens, model = None, self.model
        try:
            response, batched = _batch_result(response)
            again = _priced_before(response)
            if again is not None:
                warn_at_caller(again, AlreadyPricedWarning)
                return Decimal(0), None, None, model
            model = self._billed_to(response)
            usd, problem = self._priced_reply(response, batched, model)
            tokens = self._tokens(response)
        except UsageMissing as e:
            usd, problem = Decimal(0), e
        except ValueError as e:  # counts that contradict each other (more cached tokens than input ones)
            if isinstance(e, LoomcError):
                raise
            usd, problem = Decimal(0), CostUnknown(f"the reply's usage does not add up: {e}, so what it cost is "
                                                   "not known")
        if problem is None:
            return usd, None, tokens, model
        if _usd_capped():
            return (usd, type(problem)(f"{problem}; a USD budget is set, so loomc will not count it as $0"), tokens,
                    model)
        warn_at_caller(f"loomc: {problem}; what has no price is counted as $0 (no USD budget is set)", UserWarning)
        return usd, None, tokens, model

    def _tokens(self, response: Any) -> tuple[int, int]:
        """The input and output tokens billed for a reply (cached and reasoning tokens are parts of them)."""
        usage = self.usage(response)
        return usage.input, usage.output

    @builds_policy("adapter.judge(client, 'Is this done? Answer yes or no.\\n\\n{state}')")
    def judge(self, client: Any, prompt: str, *, max_tokens: int = 8, name: str = "judge",
              api: str | None = None) -> Judge:
        """A ``judge`` detector that asks this model, through ``client``, whether the state is done.

        ``prompt`` may contain ``{state}``; it should ask for a yes or a no. Each judge
        call is priced and charged to the step as its own line item (``"judge"``).
        Works with sync and async clients. A reply cut off at ``max_tokens`` before it says
        anything (a reasoning model thinks first) is a ConfigError, which ends the run: every later
        verdict would be a paid "no". ``api`` is the API asked: Anthropic's ``"messages"``; OpenAI's
        ``"chat"`` (Chat Completions, the default) or ``"responses"``, for a model only that serves.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"judge(max_tokens={max_tokens!r}): give the reply's token limit, a positive integer")
        if api is None:
            api = self.apis[0]
        elif api not in self.apis:
            raise ConfigError(f"judge(api={api!r}): {type(self).__name__} asks through "
                              f"{' or '.join(repr(a) for a in self.apis)}")
        if "{state}" not in prompt:
            prompt = prompt.rstrip() + "\n\n{state}"
        room = (f"{type(self).__name__}({self.model!r}).judge(client, prompt, max_tokens=2000"
                f"{'' if api == self.apis[0] else f', api={api!r}'})")  # what a reply cut off asks for

        def ask(state: Any) -> Any:
            reply = self._ask(client, prompt.replace("{state}", str(state)), max_tokens, api)
            if inspect.isawaitable(reply):
                return self._settle_later(reply, name, max_tokens, room)
            return self._settle(reply, name, max_tokens, room)

        ask.__name__ = f"{type(self).__name__}({self.model!r}).judge"
        # Two prompts to one model are two judges: a replay of one must not read the other's verdicts.
        asked = hashlib.sha256(f"{api}\0{max_tokens}\0{prompt}".encode()).hexdigest()[:8]
        ask.loomc_asks = f" asking {asked}"  # type: ignore[attr-defined]
        return judge(ask, name=name)

    def _settle(self, reply: Any, item: str, max_tokens: int, room: str) -> str | None:
        self.charge(reply, item)
        return self._verdict(reply, max_tokens, room)

    async def _settle_later(self, reply: Any, item: str, max_tokens: int, room: str) -> str | None:
        reply = await reply
        await self.acharge(reply, item)
        return self._verdict(reply, max_tokens, room)

    def _verdict(self, reply: Any, max_tokens: int, room: str) -> str | None:
        """The reply's text, or ``None`` for a reply with none (a refusal): no verdict, which a run's first
        successful step tells (NoVerdictWarning)."""
        text = self._text(reply)
        if text.strip():
            return text
        if self._cut_off(reply):
            raise ConfigError(
                f"the judge's reply from {self.model} was cut off at max_tokens={max_tokens} before it said "
                "anything (a reasoning model spends its tokens thinking first), so every verdict would be a "
                f"paid no: give it room, as in {room}")
        return None

    #: The APIs ``judge`` can ask through, the default first.
    apis: tuple[str, ...] = ()

    def _ask(self, client: Any, text: str, max_tokens: int, api: str) -> Any:
        raise NotImplementedError

    def _text(self, reply: Any) -> str:
        raise NotImplementedError

    def _cut_off(self, reply: Any) -> bool:
        """Whether the reply stopped at its token limit."""
        raise NotImplementedError


class AnthropicAdapter(_Adapter):
    """Prices Anthropic ``Message`` responses; ``judge`` asks through ``client.messages.create``.

    ``provider="aws"`` (Bedrock, with the model id it bills, ``us.anthropic.claude-...-v1:0``) prices a reply
    served there at the prices genai-prices lists for it."""

    provider = "anthropic"
    geo_multipliers = {"us": Decimal("1.1")}  # US-only inference (inference_geo="us")

    def usage(self, response: Any) -> TokenUsage:
        return anthropic_usage(response)

    def _priced_reply(self, response: Any, batched: bool, model: str) -> Priced:
        self._warn_unpriced(_get(response, "content"))
        return self._priced_usage(response, batched, model)

    def _priced_usage(self, response: Any, batched: bool, model: str) -> Priced:
        """The top-level counts, or, when the response lists ``usage.iterations``, each iteration.

        Compaction and advisor iterations are not in the top-level counts, and an advisor or a
        fallback iteration names its own model. The iterations that served the reply (``message``,
        ``fallback_message``) are priced one by one at their own model's prices: each is its own
        request, for long-context tiers too. Should the top-level counts hold more tokens than those
        iterations, they are priced as well, at ``model`` (the reply's), and the dearer reading counts.
        """
        usage = _anthropic_usage_block(response)
        top, entries = _at_batch_prices(_anthropic_top(usage), batched), _get(usage, "iterations") or ()
        if not entries:
            return self._price_lines([(model, top)])
        served: list[Line] = []
        extra: list[Line] = ([(model, TokenUsage(input=0, output=0, context=top.context,
                                                 web_search=top.web_search))] if top.web_search else [])
        for entry in entries:
            line = (self._name(_get(entry, "model") or model),
                    _anthropic_tokens(entry, context=top.context, inference_geo=top.inference_geo))
            (served if _get(entry, "type") in _SERVING else extra).append(line)
        parts, parts_problem = self._price_lines(served)
        usd, problem = self._price_lines(extra)
        if all(getattr(top, count) <= sum(getattr(u, count) for _, u in served) for count in ("input", "output")):
            return parts + usd, _together((parts_problem, problem))
        whole, whole_problem = self._price_lines([(model, replace(top, web_search=0))])
        return max(whole, parts) + usd, _together((parts_problem, whole_problem, problem))

    def _tokens(self, response: Any) -> tuple[int, int]:
        """As priced: the iterations that served the reply (or the top-level counts, where they hold more),
        and the compaction and advisor iterations besides."""
        usage = _anthropic_usage_block(response)
        top, entries = _anthropic_top(usage), _get(usage, "iterations") or ()
        served, extra = [0, 0], [0, 0]
        for entry in entries:
            counts = _anthropic_tokens(entry)
            into = served if _get(entry, "type") in _SERVING else extra
            into[0] += counts.input
            into[1] += counts.output
        return max(top.input, served[0]) + extra[0], max(top.output, served[1]) + extra[1]

    apis = ("messages",)

    def _ask(self, client: Any, text: str, max_tokens: int, api: str) -> Any:
        return client.messages.create(model=self.model, max_tokens=max_tokens,
                                      messages=[{"role": "user", "content": text}])

    def _text(self, reply: Any) -> str:
        return "".join(_get(block, "text") or "" for block in (_get(reply, "content") or ())
                       if _get(block, "type") == "text")

    def _cut_off(self, reply: Any) -> bool:
        return _get(reply, "stop_reason") == "max_tokens"


class OpenAIAdapter(_Adapter):
    """Prices ``ChatCompletion`` and Responses-API ``Response``; ``judge`` asks through Chat Completions, or the
    Responses API with ``api="responses"``.

    ``provider`` names another provider that serves the OpenAI API (``"deepseek"``, ``"groq"``, ``"openrouter"``,
    ``"x-ai"``...), at the prices genai-prices lists for its models; its service tiers, its own, are priced at
    those prices."""

    provider = "openai"

    def usage(self, response: Any) -> TokenUsage:
        usage = openai_usage(response)
        if usage.context and self.provider != type(self).provider:  # OpenAI's tiers are not another's
            return replace(usage, context=())
        return usage

    def _priced_reply(self, response: Any, batched: bool, model: str) -> Priced:
        self._warn_unpriced(_get(response, "output"))
        if self.provider == "openrouter":
            billed = _openrouter_bill(response)
            if billed is not None:
                return billed, None
        return super()._priced_reply(response, batched, model)

    apis = ("chat", "responses")

    def _ask(self, client: Any, text: str, max_tokens: int, api: str) -> Any:
        if api == "responses":  # which takes no limit below 16 tokens
            return client.responses.create(model=self.model, input=text, max_output_tokens=max(max_tokens, 16))
        # Other providers of the API take the older max_tokens (DeepSeek ignores max_completion_tokens); OpenAI's
        # reasoning models take max_completion_tokens only.
        limit = ({"max_completion_tokens": max_tokens} if self.provider == type(self).provider
                 else {"max_tokens": max_tokens})
        return client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": text}], **limit)

    def _text(self, reply: Any) -> str:
        choices = _get(reply, "choices")
        if choices is None:  # a Responses-API reply: the text of its message items
            return "".join(_get(part, "text") or "" for item in (_get(reply, "output") or ())
                           if _get(item, "type") == "message" for part in (_get(item, "content") or ())
                           if _get(part, "type") == "output_text")
        return str(_get(_get(choices[0], "message"), "content") or "") if choices else ""

    def _cut_off(self, reply: Any) -> bool:
        choices = _get(reply, "choices")
        if choices is None:
            return (_get(reply, "status") == "incomplete"
                    and _get(_get(reply, "incomplete_details"), "reason") == "max_output_tokens")
        return bool(choices) and _get(choices[0], "finish_reason") == "length"


def _rates(rates: Mapping[str, Any], name: str = "rates") -> dict[str, Decimal]:
    if not isinstance(rates, Mapping):
        raise ConfigError(f"{name}={rates!r}: give a dict of dollars per million tokens, as in "
                          "{'input': 3.0, 'output': 15.0}")
    unknown = set(rates) - set(RATE_KEYS)
    if unknown or "input" not in rates or "output" not in rates:
        raise ConfigError(f"{name}={dict(rates)!r}: give dollars per million tokens for 'input' and 'output', "
                          f"and optionally {', '.join(repr(k) for k in TOKEN_RATES[2:])}, 'input_audio', "
                          f"'output_audio', {' and '.join(repr(k) for k in IMAGE_RATES)}; and dollars per thousand "
                          f"calls for "
                          f"{' and '.join(repr(k) for k in CALL_RATES)}")
    try:
        out = {k: to_decimal(v, f"{name}[{k!r}]") for k, v in rates.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    out.setdefault("cache_read", out["input"])
    out.setdefault("cache_write", out["input"])
    out.setdefault("cache_write_1h", out["cache_write"])
    return out


def _price_with_rates(u: TokenUsage, r: dict[str, Decimal]) -> Decimal:
    """Tokens, and the parts with prices of their own that ``r`` prices (the caller reports the
    others); audio and image tokens ``r`` has no price for are left at the text prices."""
    hour = u.cache_write_1h or 0
    five = u.cache_write - hour
    audio_in = u.input_audio if "input_audio" in r else 0
    audio_out = u.output_audio if "output_audio" in r else 0
    image_in = u.input_image if "input_image" in r else 0
    image_out = u.output_image if "output_image" in r else 0
    uncached = max(u.input - u.cache_read - u.cache_write - audio_in - image_in, 0)
    total = (uncached * r["input"] + u.cache_read * r["cache_read"] + five * r["cache_write"]
             + hour * r["cache_write_1h"] + (u.output - audio_out - image_out) * r["output"]
             + image_in * r.get("input_image", 0) + image_out * r.get("output_image", 0)) / MILLION
    return total + sum((n * r[kind] / _PARTS[kind][2] for kind, n in u.parts().items() if kind in r), Decimal(0))


def _counts(usage: TokenUsage) -> dict[str, int]:
    """``usage`` as genai-prices' Usage fields."""
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
    for kind, n in usage.parts().items():
        counts[_PARTS[kind][0]] = n
    if usage.input_image:
        counts["input_image_tokens"] = usage.input_image
    if usage.output_image:
        counts["output_image_tokens"] = usage.output_image
    return counts


def _together(problems: Iterable[CostUnknown | None]) -> CostUnknown | None:
    """One error for the parts that could not be priced, or None."""
    unknown = [e for e in problems if e is not None]
    return unknown[0] if len(unknown) == 1 else CostUnknown("; ".join(map(str, unknown))) if unknown else None


def _known(priced: Priced) -> Decimal:
    usd, problem = priced
    if problem is not None:
        raise problem
    return usd


def _parts_text(usage: TokenUsage, kinds: list[str]) -> str:
    counts = usage.parts()
    return " and ".join(counted(counts[k], _PARTS[k][3]) for k in kinds)


def _rate_keys_text(kinds: list[str]) -> str:
    return ", ".join(f"{k!r} (dollars per {'thousand calls' if _PARTS[k][2] is THOUSAND else 'million tokens'})"
                     for k in kinds)


def _tokens_text(usage: TokenUsage) -> str:
    parts = _parts_text(usage, [k for k in usage.parts() if k in CALL_RATES])
    return f"{usage.input} input and {usage.output} output tokens{' and ' + parts if parts else ''}"


async def _written(counted: tuple[Any, int, Decimal, str] | None, usd: Decimal,
                   problem: CostUnknown | None) -> Decimal:
    """What ``adapter.acharge`` awaits once its spend is counted: the write-ahead, then the part it could not
    price, if any."""
    if counted is not None:
        await write_ahead(*counted)
    if problem is not None:
        raise problem
    return usd


def _batch_result(response: Any) -> tuple[Any, bool]:
    """The reply inside one result of a batch API, and True; else ``response`` itself, and False.

    An Anthropic ``MessageBatchIndividualResponse`` holds its message in ``result`` when it succeeded;
    a line of an OpenAI Batch API output file holds its reply in ``response.body`` when its status is 200.
    Either holds no reply otherwise, and loomc does not know what such a request was billed.
    """
    custom_id = _get(response, "custom_id")
    if custom_id is None:
        return response, False
    result = _get(response, "result")
    if result is not None:  # Anthropic
        kind = _get(result, "type")
        message = _get(result, "message")
        if kind == "succeeded" and message is not None:
            return message, True
        raise UsageMissing(f"batch result {custom_id!r} {kind}, so it holds no message to price: charge the results "
                           "that succeeded (result.type == 'succeeded'), and record what else you know was billed "
                           "with loomc.charge(usd)")
    line = _get(response, "response")
    body = _get(line, "body")
    if body is not None and _get(line, "status_code") == 200:  # OpenAI
        return body, True
    raise UsageMissing(f"batch output line {custom_id!r} holds no reply to price (status {_get(line, 'status_code')}, "
                       f"error {_get(response, 'error')!r}): charge the lines whose response.status_code is 200, "
                       "and record what else you know was billed with loomc.charge(usd)")


def _at_batch_prices(usage: TokenUsage, batched: bool) -> TokenUsage:
    """``usage`` priced as a batch API's (half price, as genai-prices lists it) when it came from one."""
    if not batched or ("processing", "batch") in usage.context:
        return usage
    return replace(usage, context=(*usage.context, ("processing", "batch")))


def _priced_before(response: Any) -> str | None:
    """What to warn if the run whose step is in flight has priced ``response`` (by its id) before; else
    ``None``, and the run remembers it. The API billed each response once, so it is counted once: priced by
    both ``charge(reply)`` and ``cost_fn``, or found again by ``cost_fn`` in a state fn returned without a
    new call."""
    run = current_run()
    rid = _get(response, "id") or _get(_get(response, "response"), "id")  # a reply, or a stream event holding one
    if run is None or not isinstance(rid, str):
        return None
    if rid not in run.priced:
        run.priced.add(rid)
        return None
    return (f"loomc: run {run.id} has priced response {rid} already, so it is counted once, not again in step "
            f"{run.in_flight}. Price each reply one way (adapter.charge(reply) in fn, or cost_fn=adapter.cost_fn); "
            "with cost_fn, a state fn returns without a new call should not carry the old state['_response']")


def _genai_prices() -> Any:
    try:
        import genai_prices
    except ImportError:
        raise ConfigError('pricing by model name needs genai-prices: pip install "loomc[adapters]", '
                          "or pass rates={...} in dollars per million tokens") from None
    return genai_prices


def _openrouter_bill(response: Any) -> Decimal | None:
    """What OpenRouter says a reply cost (``usage.cost``, in dollars, where the request asked for it with
    ``usage={"include": True}``), with, for a call on your own key (BYOK), what the provider billed that key; None
    where it does not say. It is what was billed, which a price list only estimates: OpenRouter routes a model to
    providers at different prices."""
    usage = _get(response, "usage")
    cost = _get(usage, "cost")
    if cost is None:
        return None
    billed = to_decimal(cost, "OpenRouter's usage.cost")
    if _get(usage, "is_byok"):
        upstream = _get(_get(usage, "cost_details"), "upstream_inference_cost")
        if upstream is not None:
            billed += to_decimal(upstream, "OpenRouter's usage.cost_details.upstream_inference_cost")
    return billed


def _check_provider(provider: str) -> None:
    """ConfigError unless genai-prices lists prices of ``provider`` (an id such as ``deepseek``)."""
    import difflib
    _genai_prices()  # which says how to install it
    from genai_prices import data_snapshot
    known = [p.id for p in data_snapshot.get_snapshot().providers]
    if provider not in known:
        near = difflib.get_close_matches(provider.lower(), known, n=3, cutoff=0.5)
        raise ConfigError(f"genai-prices knows no provider {provider!r}"
                          + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else "")
                          + f"; the ids it knows: {', '.join(known)}; or pass rates={{...}} in dollars per million "
                          "tokens")


@functools.lru_cache(maxsize=256)
def _listed(provider: str, model: str) -> str | None:
    """The id genai-prices lists ``model`` under (a snapshot and its alias share one), or ``None``."""
    prices = _genai_prices()
    try:
        price = prices.calc_price(prices.Usage(input_tokens=0, output_tokens=0), model, provider_id=provider)
        return str(price.model.id)
    except LookupError:
        return None


def _usd_capped() -> bool:
    run = current_run()
    return run is not None and run.usd_room() is not None
