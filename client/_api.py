"""The methods of both clients, each from one definition.

An RPC method is its builder in :mod:`._calls`: signature, docstring,
validation, request and parsing. :class:`Rpc` makes that builder a method of
the blocking client (``return client._invoke(call)``) and of the asyncio client
(``return await client._invoke(call)``), so the two cannot drift apart; each
client keeps only its channel, its ``_invoke`` loop and its sleeps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from types import MethodType
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import _calls
from ._calls import Call

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

WAIT_UNTIL_SERVING = """Wait until the health check says SERVING.

    Raises:
        TimeoutError: not SERVING within ``timeout`` seconds.
    """
CLOSE = "Close the channel; further calls raise ``ClientClosedError``. Idempotent."


def doc(text: str) -> Callable[[F], F]:
    """Set the docstring of a method each client implements itself to the text both share."""

    def apply(fn: F) -> F:
        fn.__doc__ = text
        return fn

    return apply


class Rpc(Generic[P, T]):
    """A client method made from a ``_calls`` builder.

    On a :class:`Blocking` client it returns the result; on an :class:`Asynchronous`
    one it is a coroutine function, which builds the call (and so validates the
    arguments) when awaited, like any ``async def``.
    """

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        def blocking(client: Blocking, /, *args: P.args, **kwargs: P.kwargs) -> T:
            return client._invoke(build(*args, **kwargs))

        async def asynchronous(client: Asynchronous, /, *args: P.args, **kwargs: P.kwargs) -> T:
            return await client._invoke(build(*args, **kwargs))

        self._blocking = _method_of(build, blocking)
        self._asynchronous = _method_of(build, asynchronous)

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...

    @overload
    def __get__(
        self, client: Asynchronous, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __get__(self, client: Blocking, owner: type | None = None) -> Callable[P, T]: ...

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        cls = owner if owner is not None else type(client)
        fn = self._asynchronous if issubclass(cls, Asynchronous) else self._blocking
        return fn if client is None else MethodType(fn, client)


def _method_of(build: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` dressed as the builder: its name and docstring, its signature with ``self``
    in front and the result type instead of ``Call[result]``."""
    functools.update_wrapper(fn, build)
    signature = inspect.signature(build)
    returns = signature.return_annotation
    # _calls uses postponed annotations, so the result type is the text inside Call[...]
    if not (isinstance(returns, str) and returns.startswith("Call[") and returns.endswith("]")):
        raise TypeError(f"{build.__name__} must be annotated '-> Call[...]', not {returns!r}")
    result = returns[len("Call["):-1]
    client = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[client, *signature.parameters.values()], return_annotation=result)
    fn.__annotations__ = {**build.__annotations__, "return": result}
    return fn


class _Methods:
    """The RPC methods; ``wait_until_serving`` and ``close`` are each client's own."""

    health = Rpc(_calls.health)
    model_info = Rpc(_calls.model_info)
    compress = Rpc(_calls.compress)
    compress_checked = Rpc(_calls.compress_checked)
    decompress = Rpc(_calls.decompress)
    write = Rpc(_calls.write)
    read = Rpc(_calls.read)
    remember = Rpc(_calls.remember)
    recall = Rpc(_calls.recall)
    create_bank = Rpc(_calls.create_bank)
    list_banks = Rpc(_calls.list_banks)
    describe_bank = Rpc(_calls.describe_bank)
    delete_slots = Rpc(_calls.delete_slots)
    clear_bank = Rpc(_calls.clear_bank)
    drop_bank = Rpc(_calls.drop_bank)
    create_snapshot = Rpc(_calls.create_snapshot)
    list_snapshots = Rpc(_calls.list_snapshots)
    restore_snapshot = Rpc(_calls.restore_snapshot)


class Blocking(_Methods):
    """Base of ``MemoryClient``: every RPC method runs ``self._invoke(call)``."""

    def _invoke(self, call: Call[T]) -> T:
        raise NotImplementedError


class Asynchronous(_Methods):
    """Base of ``AsyncMemoryClient``: every RPC method awaits ``self._invoke(call)``."""

    async def _invoke(self, call: Call[T]) -> T:
        raise NotImplementedError
