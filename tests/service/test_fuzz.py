"""Random bodies never produce a server error (hypothesis, bounded examples, the real app)."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_FIELDS = st.fixed_dictionaries({}, optional={
    "images": st.lists(st.one_of(st.text(max_size=30), st.binary(max_size=300).map(
        lambda b: base64.b64encode(b).decode())), max_size=3),
    "label_set": st.one_of(_JSON, st.fixed_dictionaries({"classes": st.lists(st.text(max_size=20), max_size=4)},
                                                        optional={"templates": st.lists(st.text(max_size=20),
                                                                                        max_size=3)})),
    "label_set_id": st.text(max_size=30),
    "coefficients": st.text(max_size=30),
    "top_k": _JSON,
})
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(body=st.binary(max_size=2048), ctype=st.sampled_from(["application/json", "image/png", "text/plain",
                                                             "multipart/form-data; boundary=x"]))
def test_random_bytes_never_5xx(client: TestClient, body: bytes, ctype: str) -> None:
    r = client.post("/classify", content=body, headers={"content-type": ctype})
    assert r.status_code < 500, r.text
    assert "error" in r.json()


@_SETTINGS
@given(payload=st.one_of(_JSON, _FIELDS))
def test_random_json_never_5xx(client: TestClient, payload: object) -> None:
    for path in ("/classify", "/label-sets", "/fit-alignment"):
        r = client.post(path, json=payload)
        assert r.status_code < 500, (path, r.text)
