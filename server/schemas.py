"""The shapes of the HTTP API and the live frames: request bodies, responses, errors.

Requests are validated strictly: integers are JSON integers (not 1.5, "2" or true) and
unknown fields are refused. Responses are rendered through the same models, so the
OpenAPI document and what is sent cannot drift apart.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from server.clock import iso
from server.model import Product, Reservation, Status

MAX_INT32 = 2**31 - 1
MAX_STOCK = 1_000_000_000
DEFAULT_MAX_QUANTITY = 10

ProductId = Annotated[int, Field(ge=1, le=MAX_INT32, description="A product's id.")]


class _Request(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=False
    )


class _Response(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, serialize_by_alias=True, validate_by_name=True
    )


# -- requests ----------------------------------------------------------------------------


class ReserveBody(_Request):
    product_id: ProductId
    quantity: Annotated[
        int,
        Field(ge=1, le=MAX_INT32, description="Units to hold, from 1 to MAX_QUANTITY."),
    ]

    @field_validator("quantity")
    @classmethod
    def _at_most_max_quantity(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_quantity", DEFAULT_MAX_QUANTITY)
        if value > limit:
            raise ValueError(f"at most {limit} units can be held at once")
        return value


class CreateProductBody(_Request):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    price: Annotated[
        Decimal,
        Field(
            ge=0,
            le=10_000_000,
            decimal_places=2,
            allow_inf_nan=False,
            description="In the shop's currency, at most 2 decimals.",
        ),
    ]
    stock: Annotated[int, Field(ge=0, le=MAX_STOCK)]
    sale_starts_at: AwareDatetime | None = Field(
        default=None, description="ISO-8601 time with an offset; before it, holds are refused."
    )

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the name cannot be blank")
        return value.strip()


class RestockBody(_Request):
    quantity: Annotated[int, Field(ge=1, le=MAX_STOCK)]


# -- responses ---------------------------------------------------------------------------


class ProductOut(_Response):
    id: int
    name: str
    price: float = Field(description="Exact to the cent: stored as integer cents.")
    available_stock: int
    total_stock: int
    version: int = Field(description="Goes up by at least 1 on every stock change.")
    sale_starts_at: str | None = Field(description="ISO-8601 UTC, or null: on sale now.")

    @classmethod
    def of(cls, product: Product) -> ProductOut:
        return cls(
            id=product.id,
            name=product.name,
            price=product.price_cents / 100,
            available_stock=product.available_stock,
            total_stock=product.total_stock,
            version=product.version,
            sale_starts_at=None if product.sale_starts_at is None else iso(product.sale_starts_at),
        )


class ReservationOut(_Response):
    id: str = Field(description="Opaque and unguessable: whoever knows it can act on the hold.")
    product_id: int
    quantity: int
    status: Status = Field(
        description="ACTIVE until completed, cancelled or expired. A hold whose expiresAt has "
        "passed is shown as EXPIRED even before the worker has restored its units."
    )
    created_at: str
    expires_at: str
    completed_at: str | None
    product: ProductOut
    server_time: str = Field(description="The server's clock when this was rendered.")

    @classmethod
    def of(cls, reservation: Reservation, product: Product, *, now: int) -> ReservationOut:
        return cls(
            id=reservation.id,
            product_id=reservation.product_id,
            quantity=reservation.quantity,
            status=reservation.effective_status(now),
            created_at=iso(reservation.created_at),
            expires_at=iso(reservation.expires_at),
            completed_at=None
            if reservation.completed_at is None
            else iso(reservation.completed_at),
            product=ProductOut.of(product),
            server_time=iso(now),
        )


class FieldError(_Response):
    field: str = Field(description="Where in the body, dotted; empty for the body as a whole.")
    message: str


class ErrorOut(_Response):
    status_code: int
    error: str = Field(description="The HTTP reason phrase.")
    code: str = Field(description="Stable, for programs: insufficient_stock, invalid_request…")
    message: str = Field(description="One human sentence.")
    details: list[FieldError] | None = None


class StatsOut(_Response):
    product_id: int
    total: int
    available: int
    held: int
    sold: int
    expired: int
    cancelled: int


class HealthOut(_Response):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
