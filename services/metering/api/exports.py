"""Finance exports (DESIGN §6.4): ``GET /v1/exports/ledger`` streamed as CSV, JSONL or Parquet.

Read-only; the billing token or the admin token. Everything that can be refused is checked
before the first byte is sent, so bad input is a 400/404 in the error shape; the rows
themselves come from ``services.metering.ledger_export``, the same code as ``tollhouse
export``. Columns: docs/exports.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from services.metering.api.auth import ADMIN, BILLING, require_billing_read, role_checked_route
from services.metering.api.query import bad, check_range, only_params, query_id, query_instant
from services.metering.api.schemas import ErrorBody
from services.metering.ledger_export import EXPORT_FORMATS, MEDIA_TYPES, export_ledger
from services.metering.store.billing import BillingStore, LedgerQuery

log = structlog.get_logger("tollhouse.metering.exports")

router = APIRouter(
    tags=["exports"],
    dependencies=[Depends(require_billing_read)],
    route_class=role_checked_route(BILLING, ADMIN),
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 404)},
)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


async def _logged(chunks: AsyncIterator[bytes], **context: object) -> AsyncIterator[bytes]:
    """Once streaming has begun a failure can only cut the response short: log why."""
    sent = 0
    try:
        async for chunk in chunks:
            sent += 1
            yield chunk
    except Exception as exc:
        log.error("export_failed", chunks_sent=sent, error=repr(exc), **context)
        raise


@router.get(
    "/v1/exports/ledger",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The ledger entries, streamed; columns in docs/exports.md",
            "content": {media.split(";")[0]: {} for media in MEDIA_TYPES.values()},
        }
    },
    dependencies=[Depends(only_params("from", "to", "account_id", "format"))],
)
async def export_ledger_route(
    request: Request,
    from_: Annotated[str, Query(alias="from", description="event_time ≥ this RFC 3339 instant")],
    to: Annotated[str, Query(description="event_time < this RFC 3339 instant, exclusive")],
    account_id: Annotated[str | None, Query(description="Only this account (default: every account)")] = None,
    format: Annotated[str, Query(description="csv (default), jsonl or parquet")] = "csv",
) -> StreamingResponse:
    """Ledger entries with event_time in [from, to), in entry_id order, as of one snapshot.

    Streamed with constant memory; the column order is stable and documented in
    docs/exports.md (new columns are only ever appended).
    """
    time_from, time_to = query_instant(from_, "from"), query_instant(to, "to")
    assert time_from is not None and time_to is not None  # required parameters, so given
    check_range(time_from, time_to)
    account_id = query_id(account_id, "account_id")
    if format not in EXPORT_FORMATS:
        raise bad("query.format", f"{format[:40]!r} is not a format; use one of {', '.join(EXPORT_FORMATS)}")
    engine = request.app.state.engine
    await BillingStore(engine).check_scope(account_id=account_id, key_id=None)
    query = LedgerQuery(account_id, time_from, time_to)
    filename = f"ledger-{account_id or 'all'}-{_stamp(time_from)}-{_stamp(time_to)}.{format}"
    return StreamingResponse(
        _logged(export_ledger(engine, query, format), account_id=account_id, format=format),
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )
