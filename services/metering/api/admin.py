"""Control-plane API (DESIGN §6.2), admin token only: accounts, top-ups, packages, keys, prices.

Routers validate and translate; the SQL lives in ``services.metering.store.admin``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response, status

from services.contracts.errors import INVALID_REQUEST, TollhouseError
from services.contracts.money import format_cny, format_fraction, format_price
from services.metering.api.auth import ADMIN, require_admin, role_checked_route
from services.metering.api.cursors import decode_cursor, encode_cursor, strict_int
from services.metering.api.query import MODEL_FORMAT, Cursor, Limit, model_name, model_query, page_limit, path_id
from services.metering.api.schemas import (
    AccountCreate,
    AccountOut,
    ErrorBody,
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyUpdate,
    PackageCreate,
    PackageOut,
    PriceCreate,
    PriceList,
    PriceOut,
    TopupCreate,
    TopupOut,
    check_model_name,
    parse_rfc3339,
)
from services.metering.api.stores import app_now
from services.metering.domain.pricing import PriceRow
from services.metering.store.admin import (
    AccountRecord,
    AdminStore,
    KeyChanges,
    KeyRecord,
    PackageRecord,
    PriceKey,
    TopupRecord,
    new_api_key_secret,
)

_errors = {
    status_code: {"model": ErrorBody}
    for status_code in (400, 401, 403, 404, 409, 413)
}

router = APIRouter(
    tags=["control plane"],
    dependencies=[Depends(require_admin)],
    route_class=role_checked_route(ADMIN),  # the token is checked before the body is read
    responses=_errors,
)


def admin_store(request: Request) -> AdminStore:
    """The store ``create_app`` built (``app.state.admin_store``)."""
    return request.app.state.admin_store


Store = Annotated[AdminStore, Depends(admin_store)]


# Responses


def package_out(package: PackageRecord, now: datetime) -> PackageOut:
    return PackageOut(
        package_id=package.package_id,
        account_id=package.account_id,
        tokens_total=package.tokens_total,
        tokens_used=package.tokens_used,
        tokens_expired=package.tokens_expired,
        tokens_remaining=package.tokens_remaining,
        price=format_cny(package.price),
        valid_from=package.valid_from,
        valid_until=package.valid_until,
        status=package.status(now),
        created_at=package.created_at,
    )


def account_out(account: AccountRecord, now: datetime) -> AccountOut:
    return AccountOut(
        account_id=account.account_id,
        name=account.name,
        tier=account.tier,
        timezone=account.timezone,
        balance=format_cny(account.balance),
        topups_total=format_cny(account.topups_total),
        charges_total=format_cny(account.charges_total),
        balance_depleted=account.balance_depleted,
        package=package_out(account.active_package, now) if account.active_package else None,
        created_at=account.created_at,
    )


def topup_out(topup: TopupRecord) -> TopupOut:
    return TopupOut(
        entry_id=topup.entry_id,
        account_id=topup.account_id,
        reference=topup.reference,
        amount=format_cny(topup.amount),
        balance=format_cny(topup.balance),
        created_at=topup.created_at,
    )


def key_out(key: KeyRecord) -> KeyOut:
    return KeyOut(
        key_id=key.key_id,
        account_id=key.account_id,
        name=key.name,
        billing_mode=key.billing_mode,
        package_id=key.package_id,
        daily_cap=format_cny(key.daily_cap),
        monthly_cap=format_cny(key.monthly_cap),
        status=key.status,
        secret_hint=key.secret_hint,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


def price_out(price: PriceRow) -> PriceOut:
    return PriceOut(
        price_id=price.price_id,
        model=price.model,
        input_price=format_price(price.input_price),
        output_price=format_price(price.output_price),
        cached_input_price=format_price(price.cached_input_price),
        per_request_fee=format_cny(price.per_request_fee),
        batch_discount=format_fraction(price.batch_discount_ppm),
        package_weight=format_fraction(price.package_weight_ppm),
        min_tier=price.min_tier,
        effective_from=price.effective_from,
    )


# Accounts


@router.post("/v1/accounts", status_code=status.HTTP_201_CREATED, response_model=AccountOut)
async def create_account(body: AccountCreate, request: Request, store: Store) -> AccountOut:
    account = await store.create_account(name=body.name, tier=body.tier, timezone=body.timezone)
    return account_out(account, app_now(request))


@router.get("/v1/accounts/{account_id}", response_model=AccountOut)
async def get_account(account_id: str, request: Request, store: Store) -> AccountOut:
    account = await store.get_account(path_id(account_id, "account"))
    return account_out(account, app_now(request))


@router.post(
    "/v1/accounts/{account_id}/topups",
    status_code=status.HTTP_201_CREATED,
    response_model=TopupOut,
    responses={200: {"model": TopupOut, "description": "This reference was already credited: the original top-up"}},
)
async def top_up(account_id: str, body: TopupCreate, response: Response, store: Store) -> TopupOut:
    """Credit the balance. Idempotent on ``reference``: a repeat returns the original (200)."""
    topup, created = await store.top_up(
        path_id(account_id, "account"), amount=body.amount, reference=body.reference
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return topup_out(topup)


@router.post("/v1/accounts/{account_id}/packages", status_code=status.HTTP_201_CREATED, response_model=PackageOut)
async def create_package(account_id: str, body: PackageCreate, request: Request, store: Store) -> PackageOut:
    """Sell a token package; 409 while another package of the account is active."""
    now = app_now(request)
    valid_from = body.valid_from or now
    if body.valid_until <= valid_from:
        raise TollhouseError(
            INVALID_REQUEST,
            f"body.valid_until: {body.valid_until.isoformat()} must be after valid_from {valid_from.isoformat()}",
        )
    if body.valid_until <= now:
        raise TollhouseError(
            INVALID_REQUEST,
            f"body.valid_until: {body.valid_until.isoformat()} is in the past; a package must end later",
        )
    package = await store.create_package(
        path_id(account_id, "account"),
        tokens=body.tokens,
        price=body.price,
        valid_from=valid_from,
        valid_until=body.valid_until,
    )
    return package_out(package, now)


# Keys


@router.post("/v1/accounts/{account_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(account_id: str, body: KeyCreate, store: Store) -> KeyCreated:
    """Create an API key. The response is the only time ``api_key`` is shown."""
    secret = new_api_key_secret()
    key = await store.create_key(
        path_id(account_id, "account"),
        name=body.name,
        billing_mode=body.billing_mode,
        package_id=body.package_id,
        daily_cap=body.daily_cap,
        monthly_cap=body.monthly_cap,
        secret=secret,
    )
    return KeyCreated(**key_out(key).model_dump(), api_key=secret)


@router.get("/v1/keys/{key_id}", response_model=KeyOut)
async def get_key(key_id: str, store: Store) -> KeyOut:
    return key_out(await store.get_key(path_id(key_id, "key")))


@router.patch("/v1/keys/{key_id}", response_model=KeyOut)
async def update_key(key_id: str, body: KeyUpdate, store: Store) -> KeyOut:
    """Change the name, caps or package binding; only the fields sent change."""
    sent = frozenset(body.model_fields_set)
    for field in ("name", "daily_cap", "monthly_cap"):
        if field in sent and getattr(body, field) is None:
            hint = ' (send "0" for unlimited)' if field.endswith("_cap") else ""
            raise TollhouseError(INVALID_REQUEST, f"body.{field}: must not be null{hint}")
    changes = KeyChanges(
        fields=sent,
        name=body.name,
        package_id=body.package_id,
        daily_cap=body.daily_cap,
        monthly_cap=body.monthly_cap,
    )
    return key_out(await store.update_key(path_id(key_id, "key"), changes))


@router.post("/v1/keys/{key_id}/revoke", response_model=KeyOut)
async def revoke_key(key_id: str, store: Store) -> KeyOut:
    """Revoke a key for good (idempotent). A revoked key cannot be restored: create another."""
    return key_out(await store.revoke_key(path_id(key_id, "key")))


# Prices


@router.put("/v1/prices/{model:path}", status_code=status.HTTP_201_CREATED, response_model=PriceOut)
async def put_price(
    body: PriceCreate,
    request: Request,
    store: Store,
    model: str = Path(description="Exact, case-sensitive model id; may contain '/'", json_schema_extra=MODEL_FORMAT),
) -> PriceOut:
    """Add a price version for ``model``. Rows are never edited: each PUT adds a version."""
    model = model_name(model, "path.model")
    price = await store.add_price(
        model,
        effective_from=body.effective_from or app_now(request),
        input_price=body.input_price,
        output_price=body.output_price,
        cached_input_price=body.input_price if body.cached_input_price is None else body.cached_input_price,
        per_request_fee=body.per_request_fee,
        batch_discount_ppm=body.batch_discount,
        package_weight_ppm=body.package_weight,
        min_tier=body.min_tier,
    )
    return price_out(price)


@router.get("/v1/prices", response_model=PriceList)
async def list_prices(
    request: Request,
    store: Store,
    model: Annotated[str | None, model_query("Only this model's versions")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> PriceList:
    """Price versions by model and effective_from, oldest first."""
    limit = page_limit(request, limit)
    page = await store.list_prices(
        model=None if model is None else model_name(model, "query.model"),
        after=None if cursor is None else decode_cursor(cursor, "prices", _parse_price_cursor),
        limit=limit,
    )
    return PriceList(
        data=[price_out(p) for p in page.rows],
        next_cursor=None if page.next_after is None else _price_cursor(page.next_after),
    )


def _price_cursor(after: PriceKey) -> str:
    model, effective_from, price_id = after
    return encode_cursor("prices", [model, effective_from.isoformat(), price_id])


def _parse_price_cursor(values: list[Any]) -> PriceKey:
    model, effective_from, price_id = values
    return check_model_name(model), parse_rfc3339(effective_from), strict_int(price_id)
