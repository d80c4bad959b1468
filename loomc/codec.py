"""JSON state codec: states go to the store as JSON and come back as their type.

No pickle, ever. A pydantic model, dataclass or TypedDict state is decoded with
pydantic against the state type (from ``fn``'s annotation, or the type recorded
with the run), so it comes back as that type, never as a plain dict.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any, get_type_hints

import pydantic_core

from loomc.errors import (CheckpointDecodeError, ConfigError, StateEncodeError, StatePruned, iso, short_repr,
                          warn_at_caller)

_PLAIN = (dict, list, str, int, float, bool, type(None))


def type_path(tp: Any) -> str | None:
    """``"module:qualname"`` of a class (a plain JSON type gives ``None``)."""
    if not isinstance(tp, type) or tp in _PLAIN:
        return None
    return f"{tp.__module__}:{tp.__qualname__}"


def import_path(path: str) -> Any:
    """The object named by ``"module:qualname"``."""
    module, _, qualname = path.partition(":")
    return attribute(importlib.import_module(module), qualname)


def attribute(obj: Any, qualname: str) -> Any:
    """``obj.a.b.c`` for ``qualname`` ``"a.b.c"``."""
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def annotated_state_type(fn: Any) -> Any:
    """The annotation of ``fn``'s first parameter, or ``None``."""
    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the recorded type
        return None
    code = getattr(fn, "__code__", None)
    if code is None or code.co_argcount == 0:
        return None
    return hints.get(code.co_varnames[0])


def is_typed(tp: Any) -> bool:
    """True when decoding needs pydantic (a model, dataclass, TypedDict, generic...)."""
    return tp is not None and tp is not Any and tp not in _PLAIN


@functools.lru_cache(maxsize=256)
def adapter(tp: Any) -> Any:
    import pydantic
    return pydantic.TypeAdapter(tp)


def check_state_type(tp: Any) -> None:
    """:class:`ConfigError` now, at decoration, if pydantic cannot decode stored states as ``tp``."""
    if not is_typed(tp):
        return
    if _pydantic_v1(tp):
        raise ConfigError(f"fn's state parameter is annotated {tp.__name__}, a model {_V1}: {_V1_ADVICE}, so that "
                          "its states can be stored and read back")
    try:
        adapter(tp)
    except Exception as e:  # pydantic's schema errors: the type is unusable, whatever the state
        raise ConfigError(
            f"fn's state parameter is annotated {getattr(tp, '__name__', tp)!s}, which pydantic cannot decode "
            f"stored states into, so no run could be resumed ({_first_line(e)}). Annotate it with a type "
            "pydantic validates (a pydantic model, a dataclass, typing_extensions.TypedDict), "
            "or remove the annotation") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def encode(state: Any) -> str:
    """JSON text for ``state``; :class:`StateEncodeError` names the field that cannot be stored."""
    try:
        text = _to_json(state)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError, RecursionError) as e:
        where, why = _find_unencodable(state, "state", ())
        advice = next((advice for what, advice in _ADVICE.items() if why.endswith(what)),
                      "return JSON-friendly values (dicts, lists, strings, numbers, pydantic models, "
                      "dataclasses), or convert it before returning")
        raise StateEncodeError(f"{where} {why}, which cannot be stored as JSON; {advice} ({e})") from None
    if b"null" in text and _writes_non_finite_as_null(state.__class__) and _holds_non_finite(state):
        text = _non_finite_kept(state, text)
    return text.decode()


@functools.lru_cache(maxsize=256)
def _writes_non_finite_as_null(cls: Any) -> bool:
    """Whether ``cls``, a pydantic model or dataclass, writes a float that is not finite (nan, inf) as null:
    pydantic's default (``ser_json_inf_nan='null'``), in it or a model it holds, which it cannot read back."""
    nodes = list(_schema_nodes(getattr(cls, "__pydantic_core_schema__", None)))
    return any(node.get("type") == "float" for node in nodes) and any(
        isinstance(config := node.get("config"), dict) and config.get("ser_json_inf_nan", "null") == "null"
        for node in nodes)


def _schema_nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a pydantic core schema, once each (a schema shares and nests its parts)."""
    todo: list[Any] = [schema]
    seen: set[int] = set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            yield node
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)


def _holds_non_finite(state: Any) -> bool:
    """Whether a float that is not finite is anywhere in ``state``: a scan of its values, without their paths, as
    quick as one can be in Python (about 1.5 times pydantic's own encoding), since most states have none."""
    stack = [state]
    pop, extend, isfinite = stack.pop, stack.extend, math.isfinite
    while stack:
        value = pop()
        cls = value.__class__
        if cls is str or cls is int or value is None or cls is bool:
            continue
        if isinstance(value, float):
            if not isfinite(value):
                return True
        elif isinstance(value, (list, tuple)):
            extend(value)
        elif isinstance(value, dict):
            extend(value.values())
        elif hasattr(cls, "__pydantic_fields__") or hasattr(cls, "__dataclass_fields__"):
            extend(getattr(value, "__dict__", {}).values())  # a model's or a dataclass's fields
    return False


def _non_finite_kept(state: Any, text: bytes) -> bytes:
    """``text`` with the floats of ``state`` that are not finite, which pydantic wrote as null, written as NaN,
    Infinity or -Infinity, which it reads back. A ``best: float = float("inf")`` field, or a NaN score kept in
    the state, came back as None: a resume, or a backtrack to that step, failed to read the state."""
    try:
        found = list(_non_finite(state, ()))
    except RecursionError:
        return text
    if not found:
        return text
    data = json.loads(text)
    for path, value in found:
        node = data
        try:
            for part in path[:-1]:
                node = node[part]
            if node[path[-1]] is None:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # a field pydantic leaves out of what it stores
            continue
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _non_finite(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], float]]:
    """The floats in ``value`` that are not finite, each with its path in the stored JSON."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield from _non_finite(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite(item, (*path, i))
    elif getattr(value, "__pydantic_root_model__", False):  # a RootModel is stored as its root alone
        yield from _non_finite(value.root, path)
    elif not isinstance(value, (str, int, bytes)):
        for name in _field_names(value):
            yield from _non_finite(getattr(value, name, None), (*path, name))


_NEVER_AWAITED = "that was never awaited"
_SURROGATE = "holding a lone surrogate, invalid in UTF-8"
_SURROGATE_ADVICE = ("such a str comes from bytes decoded with errors='surrogateescape' (file names from os.listdir, "
                     "a subprocess's output): decode them with errors='replace', or keep the bytes as text with "
                     "os.fsencode(name).decode('utf-8', 'backslashreplace')")
_V1 = "of pydantic's v1 API (pydantic.v1.BaseModel)"
_V1_ADVICE = "pydantic 2 stores no v1 model: make it a pydantic 2 model (from pydantic import BaseModel)"
_BINARY = "that is not UTF-8 text (pydantic stores bytes as UTF-8 text unless told otherwise)"
_BINARY_ADVICE = ("keep binary data (an image, a file) out of the state, with its path in it; or give the model "
                  "model_config = ConfigDict(ser_json_bytes='base64', val_json_bytes='base64'), or, in a dict, hold "
                  "it as base64 text (base64.b64encode(data).decode())")
_AWAIT_IT = "a sync fn cannot await it: write fn as `async def` and await the call"
# What to do about a value that cannot be stored, by how _find_unencodable's words about it end.
_ADVICE = {_NEVER_AWAITED: _AWAIT_IT, _SURROGATE: _SURROGATE_ADVICE, _V1: _V1_ADVICE, _BINARY: _BINARY_ADVICE}


_PLAIN_CONTAINERS = (dict, list, tuple)


def _find_unencodable(value: Any, where: str, inside: tuple[int, ...]) -> tuple[str, str]:
    """The path to the first part of ``value`` that pydantic cannot serialise, and what is wrong with it.

    ``inside`` holds the ids of the values around this one, so a cycle is named, not followed.
    """
    if id(value) in inside:
        return where, "refers back to a value that contains it (a cycle)"
    if len(inside) >= 200:  # pydantic-core stops well before this depth; Python's stack would not
        return _too_deep(where)
    inside = (*inside, id(value))
    parts: Any = ()
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{where} key {k!r}", f"is {_a(type(k).__name__)} ({short_repr(k)})"
            if isinstance(k, str) and not _encodes(k):
                return f"{where} key {k!r}", f"is a str ({short_repr(k)}) {_SURROGATE}"
        parts = ((f"{where}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        parts = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        parts = ((f"{where}.{name}", getattr(value, name)) for name in _field_names(value))
    for path, part in parts:
        if not _encodes(part):
            return _find_unencodable(part, path, inside)
    if isinstance(value, _PLAIN_CONTAINERS):  # each part stores, the whole does not: it is too deep
        return _too_deep(where)
    if inspect.isawaitable(value):  # an async call made from a sync fn
        return where, f"is {_a(type(value).__name__)} ({short_repr(value)}) {_NEVER_AWAITED}"
    if isinstance(value, str):
        return where, f"is a str ({short_repr(value)}) {_SURROGATE}"
    if _pydantic_v1(type(value)):
        return where, f"is {_a(type(value).__name__)} ({short_repr(value)}) {_V1}"
    if isinstance(value, (bytes, bytearray)):
        return where, f"is {_a(type(value).__name__)} ({short_repr(value)}) {_BINARY}"
    return where, f"is {_a(type(value).__name__)} ({short_repr(value)})"


def _pydantic_v1(tp: Any) -> bool:
    """Whether ``tp`` is a model of pydantic's v1 API (``pydantic.v1.BaseModel``), which pydantic 2 does not store."""
    return isinstance(tp, type) and any(c.__module__.startswith("pydantic.v1.") for c in tp.__mro__[1:])


def _field_names(value: Any) -> list[str]:
    """The fields of a dataclass or pydantic model instance, the parts the codec walks; else none."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    return list(getattr(type(value), "__pydantic_fields__", ()))


def _too_deep(where: str) -> tuple[str, str]:
    """A deep path, named by where it starts: ``state['deep'][0][0]...`` is ``state['deep']``."""
    top = where.split("][", 1)[0] + ("]" if "][" in where else "")
    return top, "nests lists or dicts too deeply"


def _numpy(value: Any) -> Any:
    """A numpy scalar or array as the Python value it holds, as pydantic meets one; the first state that holds
    one is warned of, since it comes back as that value (an int, a list)."""
    if type(value).__module__ == "numpy" and callable(getattr(value, "tolist", None)):
        return value.tolist()
    raise TypeError(f"Unable to serialize unknown type: {type(value)}")


# A state's JSON: fields by their names, not their aliases (a serialization alias is no name the model reads
# back); round_trip writes a Json[...] field as the JSON text it reads back. A partial, not a function: encode runs
# once per step.
_to_json = functools.partial(pydantic_core.to_json, inf_nan_mode="constants", by_alias=False, round_trip=True,
                             fallback=_numpy)


def _encodes(value: Any) -> bool:
    try:
        _to_json(value)
        return True
    except Exception:
        return False


def _decoded(text: str, state_type: Any) -> Any:
    if not is_typed(state_type):
        return json.loads(text)
    reader = adapter(state_type)
    try:  # by name, as stored, or by alias, as an earlier loomc stored a field with one
        return reader.validate_json(text, by_alias=True, by_name=True)
    except pydantic_core.ValidationError as e:
        again = _without_computed(text, e, state_type)
        if again is None:
            raise
        return reader.validate_json(again, by_alias=True, by_name=True)


def _without_computed(text: str, error: pydantic_core.ValidationError, state_type: Any) -> str | None:
    """``text`` without the computed fields a model that forbids extra fields refused; ``None`` if it refused more.

    A model's computed fields are no input. An earlier loomc stored them, and a model with ``extra="forbid"``
    refused such a state, so its run could neither be resumed nor backtracked. (They are no longer stored:
    ``round_trip`` leaves them out.)
    """
    names = _computed_names(state_type)
    errors = error.errors()
    if not names or any(e["type"] != "extra_forbidden" or not e["loc"] or e["loc"][-1] not in names for e in errors):
        return None
    data = json.loads(text)
    try:
        for e in errors:
            *path, key = e["loc"]
            node = data
            for part in path:
                node = node[part]
            del node[key]
    except (KeyError, IndexError, TypeError):  # a location that is not a path in the data (a union's tag)
        return None
    return json.dumps(data)


@functools.lru_cache(maxsize=256)
def _computed_names(state_type: Any) -> frozenset[str]:
    """The names and aliases of the computed fields of every model in ``state_type``'s schema."""
    return frozenset(name for node in _schema_nodes(adapter(state_type).core_schema)
                     if node.get("type") == "computed-field"
                     for name in (node.get("property_name"), node.get("alias")) if isinstance(name, str))


def decode(text: str, state_type: Any, *, run_id: str, step: int | str) -> Any:
    """The state stored as ``text``, validated as ``state_type`` when it has one."""
    try:
        return _decoded(text, state_type)
    except Exception as e:
        field, advice = _refusal(e, stored=True)
        name = getattr(state_type, "__name__", repr(state_type))
        raise CheckpointDecodeError(
            f"run {run_id} step {step}: the stored state no longer decodes as {name}{field}. {advice}") from None


def _refusal(e: Exception, stored: bool) -> tuple[str, str]:
    """Where a state failed to decode, as `` at field 'x': <pydantic's words>``, and what to do; ``stored`` when it
    is a run's stored state (a resume), not one about to be stored."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return f" ({_first_line(e)})", "Resume with the code the run started with, or make the type read this state"
    first = errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "(the whole state)"
    if _null_for_a_float(first):
        advice = ("pydantic stores a float that is not finite (nan, inf) as null, its default for a model, which it "
                  f"does not read back: {_INF_NAN}")
        if stored:
            advice += "; to read this run's states, where that value is gone, declare the field float | None"
    elif first.get("type") == "set_item_not_hashable":  # a set of tuples, typed as a bare set (or none at all)
        advice = ("A set's tuples are stored as JSON lists, which a set cannot hold: give the set its item type, on "
                  "fn's state parameter (set[tuple[int, int]]) or on the model's field, and they are read back as "
                  "tuples" + ("; a resume with that annotation reads this run's stored states" if stored else ""))
    elif tuple(first.get("loc", ()))[-1:] == ("[key]",):  # a dict keyed by tuples: pydantic writes (0, 1) as "0,1"
        advice = ("A dict's keys are stored as JSON text, and this key type does not read back from it (pydantic "
                  "writes a tuple key (0, 1) as '0,1'): key the dict by a str or an int, or keep the pairs as a list "
                  "(list[tuple[tuple[int, int], str]])" + ("; this run's stored states read back with the keys "
                                                          "typed str (dict[str, str])" if stored else ""))
    elif first.get("type") == "extra_forbidden":  # a field the model no longer declares
        advice = ("The stored state has a field the model no longer declares, and the model forbids extra fields: "
                  "declare it again (with a default), or resume with the old code")
    else:
        advice = ("Make the field optional or give it a default (a field pydantic leaves out of what it stores, "
                  "Field(exclude=True), needs one), or resume with the old code")
    return f" at field {loc!r}: {first.get('msg')}", advice


def decoder(state_type: Any, run_id: str,
            fetch: Callable[[int], str | None] | None = None) -> Callable[[Any, Any], Any]:
    """``decode`` for one run: ``(state_json, step) -> state``, as the run's steps read their states.

    ``fetch(step)`` reads a step's JSON from the store (``None``: it has no state), for the cells
    that hold ``IN_STORE``. A cell holding a ``PrunedState`` raises :class:`StatePruned`.
    """
    from loomc.history import IN_STORE, PrunedState

    def decode_step(text: Any, step: Any) -> Any:
        if text is IN_STORE:
            assert fetch is not None
            text = fetch(step)
            if text is None:  # a failed call's step
                return None
        elif type(text) is PrunedState:
            raise StatePruned(
                f"run {run_id} step {step}: its state was removed by `loomc prune --states` at {iso(text.at)}, "
                "which keeps every step's record but only the states a resume or the run's result needs (the "
                "initial state, and the last, last good and best steps' states); read one of those instead")
        return decode(text, state_type, run_id=run_id, step=step)
    return decode_step


def resolve_state_type(annotated: Any, recorded: str | None, known: dict[str, Any] | None = None,
                       home: str | None = None) -> Any:
    """The type to decode with: ``fn``'s annotation, else the type recorded with the run.

    ``known`` maps recorded paths to types this process has already seen (a
    class defined inside a function cannot be imported again). ``home`` is the
    module ``fn`` lives in: a type recorded by a script run as ``__main__`` is
    looked up there when this process's ``__main__`` lacks it (``loomc resume``
    imports the script under another name; so does another script that imports it).
    """
    if is_typed(annotated):
        return annotated
    if recorded:
        if known and recorded in known:
            return known[recorded]
        try:
            return import_path(recorded)
        except (ImportError, AttributeError) as e:
            module, _, qualname = recorded.partition(":")
            if module == "__main__" and home and home in sys.modules:
                try:
                    return attribute(sys.modules[home], qualname)
                except AttributeError:
                    pass
            raise ConfigError(f"the run's state type {recorded} cannot be imported ({e}), and loomc will not "
                              "hand back a plain dict in its place; annotate fn's state parameter with the "
                              "type, or define the type at module level") from None
    return None


class StateRoundTripWarning(UserWarning):
    """A state would not come back from the store as itself, so a resumed run would see it changed."""


def warn_if_changed(state: Any, text: str, state_type: Any) -> None:
    """Warn when ``state``, stored as ``text``, would decode (as ``state_type``) into something else.

    The interpreter asks this of the initial state and of the first state each process commits
    for a run, so the warning comes on the first try, long before a resume or a backtrack
    reads the state back::

        {"when": datetime(...)}   ->  state['when'] is a datetime, and comes back as a str
    """
    try:
        change = _difference(state, _decoded(text, state_type), "state")
    except RecursionError:
        return
    except Exception as e:
        field, advice = _refusal(e, stored=False)
        change = f"the stored state does not decode again{field}, so a resume would fail", advice
    if change is not None:
        what, advice = change
        warn_at_caller(f"loomc: {what} when read back from the store (by a resume, or a backtrack to it). {advice}",
                       StateRoundTripWarning)


_DECLARE = ("Declare the field's type on the state type (a TypedDict, dataclass or pydantic model annotating fn's "
            "state parameter), or keep it to JSON values: dicts with str keys, lists, str, int, float, bool, None")
_INF_NAN = "give the model model_config = ConfigDict(ser_json_inf_nan='constants'), and it stores them as they are"
_SERIALIZER = ("Its field_serializer writes what the field does not read back the same: make it write what the "
               "validator reads (a datetime as datetime.isoformat()), or keep the field out of the state")
_NUMPY = ("It is stored as the Python value it holds: convert it before returning it (x.item() for a scalar, "
          "x.tolist() for an array), or read it back as that")
_PRIVATE = ("Keep what fn needs after a resume or a backtrack in fields; a private attribute suits what fn can make "
            "again")
_EXCLUDED = ("Keep what fn needs after a resume or a backtrack in fields pydantic stores; exclude=True suits what "
             "fn can make again (a client, a cache)")
_SECRET = ("pydantic stores a secret masked, so fn would be handed the mask, not the secret: keep secrets out of the "
           "state, and read them inside fn (from the environment, or a client made once), where the store never "
           "holds them")


def stored_difference(state: Any, stored: str) -> str | None:
    """Where ``state`` first differs from the state stored as the JSON ``stored``, compared as the store
    would hold it (so key order and a tuple for a list do not count); ``None`` when they are the same."""
    try:
        now = json.loads(encode(state))
    except Exception:  # StateEncodeError: it cannot be the state that was stored
        return "the state passed cannot be stored as JSON, so it is not the one stored"
    return _first_difference(now, json.loads(stored), "state")


def _first_difference(now: Any, then: Any, where: str) -> str | None:
    if isinstance(now, dict) and isinstance(then, dict):
        for key in {**now, **then}:
            if key not in now or key not in then:
                here, there = (short_repr(now[key]), "absent") if key in now else ("absent", short_repr(then[key]))
                return f"{where}[{key!r}] is {here} in the state passed, {there} in the stored one"
            found = _first_difference(now[key], then[key], f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(now, list) and isinstance(then, list):
        for i, (a, b) in enumerate(zip(now, then)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found is not None:
                return found
        if len(now) == len(then):
            return None
        return f"{where} has {len(now)} items in the state passed, {len(then)} in the stored one"
    if type(now) is type(then) and (now == then or (now != now and then != then)):  # NaN is stored as NaN
        return None
    return f"{where} is {short_repr(now)} in the state passed, {short_repr(then)} in the stored one"


def _null_for_a_float(error: Any) -> bool:
    """Whether a validation error is pydantic refusing null for a float: a nan or inf a model stored as null."""
    return isinstance(error, dict) and error.get("type") == "float_type" and error.get("input", 0) is None


def _serialized_by_hand(model: type, name: str) -> bool:
    """Whether a pydantic model's field ``name`` is written by a ``@field_serializer`` of the model's own."""
    decorators = getattr(model, "__pydantic_decorators__", None)
    serializers = getattr(decorators, "field_serializers", {}) if decorators is not None else {}
    return any(name in d.info.fields or "*" in d.info.fields for d in serializers.values())


def _is_secret(value: Any) -> bool:
    """Whether ``value`` is a pydantic ``SecretStr`` or ``SecretBytes`` (stored masked, as ``'**********'``)."""
    pydantic = sys.modules.get("pydantic")  # none exists unless pydantic was imported
    return pydantic is not None and isinstance(value, (pydantic.SecretStr, pydantic.SecretBytes))


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _difference(live: Any, back: Any, where: str) -> tuple[str, str] | None:
    """Where ``back``, decoded from the store, first differs from ``live``, in words, and what to do about it;
    ``None`` if nowhere."""
    if _is_secret(live) and live != back:
        return f"{where} is a pydantic {type(live).__name__}, and comes back as its mask {short_repr(back)}", _SECRET
    if type(live) is not type(back):
        if type(live).__module__ == "numpy":
            return f"{where} is a numpy.{type(live).__name__}, and comes back as {_a(type(back).__name__)}", _NUMPY
        return f"{where} is {_a(type(live).__name__)}, and comes back as {_a(type(back).__name__)}", _DECLARE
    if isinstance(live, dict):
        for key, value in live.items():
            if key not in back:
                if isinstance(key, str):  # not turned into another key: left out, as a TypedDict leaves out a key
                    return (f"{where}[{key!r}] ({short_repr(value)}) is a key the state's type does not declare, "
                            "and is left out", _DECLARE)
                return f"{where} key {key!r} is {_a(type(key).__name__)}, and comes back as a str", _DECLARE
            found = _difference(value, back[key], f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(live, (list, tuple)):
        if len(live) != len(back):
            return f"{where} has {len(live)} items, and comes back with {len(back)}", _DECLARE
        for i, (value, again) in enumerate(zip(live, back)):
            found = _difference(value, again, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    names = _field_names(live)
    if not names:
        if live == back or (live != live and back != back):  # NaN is stored as NaN
            return None
        return f"{where} is {short_repr(live)}, and comes back as {short_repr(back)}", _DECLARE
    fields = getattr(type(live), "__pydantic_fields__", {})
    for name in names:
        found = _difference(getattr(live, name), getattr(back, name), f"{where}.{name}")
        if found is not None:
            if name in fields and fields[name].exclude:
                return (f"{where}.{name} is left out of what pydantic stores (Field(exclude=True)), and comes back as "
                        f"its default {short_repr(getattr(back, name))}", _EXCLUDED)
            if found[1] is _DECLARE and _serialized_by_hand(type(live), name):
                return found[0], _SERIALIZER
            return found
    private, private_back = (getattr(value, "__pydantic_private__", None) or {} for value in (live, back))
    for name, value in private.items():
        if _difference(value, private_back.get(name), "") is not None:
            return (f"{where}.{name} is {short_repr(value)}, a private attribute, which pydantic does not store: it "
                    f"comes back as {short_repr(private_back.get(name))}", _PRIVATE)
    extra, extra_back = (getattr(value, "__pydantic_extra__", None) or {} for value in (live, back))
    if _difference(extra, extra_back, "") is not None:
        return f"{where} differs in its extra fields", _DECLARE
    return None
