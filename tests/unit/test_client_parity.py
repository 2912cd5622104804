"""The Python client: Client and AsyncClient are generated from the same request builders, so they expose the same
public methods with the same parameters (issue 25.7); the async ones are coroutines."""

from __future__ import annotations

import inspect

from residual_client import AsyncClient, AsyncJob, Client, Job


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(cls, name)) for name in dir(cls)
            if not name.startswith("_") and callable(getattr(cls, name))}


def test_both_clients_have_the_same_methods_and_parameters() -> None:
    sync, asynchronous = _public(Client), _public(AsyncClient)
    assert set(sync) == set(asynchronous)
    for name in sync:
        assert list(sync[name].parameters.values()) == list(asynchronous[name].parameters.values()), name
    for name in set(sync) - {"close"}:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name
    assert {"classify", "embeddings", "fit", "upload_dataset", "build_basis", "rollback", "head_alignment"} <= set(sync)
    assert sync["fit"].return_annotation == "Job" and asynchronous["fit"].return_annotation == "AsyncJob"
    assert _public(Job).keys() == _public(AsyncJob).keys()


def test_every_method_says_what_it_does() -> None:
    for name in ("classify", "embeddings", "fit", "upload_dataset", "build_basis", "rollback"):
        assert getattr(Client, name).__doc__ and getattr(AsyncClient, name).__doc__, name
