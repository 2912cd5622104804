"""schemathesis hooks of tests/integration/test_schema_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

One generator defect of schemathesis 4.32 is worked around, nothing else: in the fuzzing phase it sends *positive*
(schema-valid) multipart ``/classify`` forms that carry both a ``label_set`` part and a ``label_set_id`` part, which
the form schema forbids (``"dependentSchemas": {"label_set": {"properties": {"label_set_id": false}}}``; an earlier
``"not": {"required": [...]}`` fared the same), and then reports the 422 as a rejected valid request. Such a case is
not valid data, so it is dropped from the positive cases; negative cases keep it, and the rule itself is tested in
tests/service/test_errors.py.
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _form_fields(body: Any) -> Any:
    return getattr(body, "body", body)  # encoded forms wrap their fields


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    meta = getattr(case, "meta", None)
    positive = meta is not None and meta.generation.mode.is_positive
    fields = _form_fields(case.body)
    both = isinstance(fields, dict) and "label_set" in fields and "label_set_id" in fields
    return not (positive and case.media_type == "multipart/form-data" and case.operation.path == "/classify" and both)
