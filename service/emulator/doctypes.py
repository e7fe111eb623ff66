"""The emulator's document-type catalogue and the fake extracted data for each type.

Each type has a JSON Schema in `schemas/<code>.json` (package data); the
generated `data` of a SUCCESS conversion validates against it. Generation is
a pure function of a `random.Random`, so the same seed gives the same data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from importlib import resources
from typing import Any, Final

JsonObject = dict[str, Any]

_CATALOGUE_TIMESTAMP: Final = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True, slots=True)
class DocumentType:
    """One entry of `GET /api/document-types`; `code` is what convert-async takes."""

    id: str
    code: str
    name: str
    description: str
    json_schema: JsonObject = field(repr=False)

    def summary(self) -> JsonObject:
        """The list representation (no schema), field names as the API spells them."""
        return {
            "id": self.id,
            "name": self.name,
            "codeType": self.code,
            "description": self.description,
            "isPublic": True,
            "isDraft": False,
            "createdAt": _CATALOGUE_TIMESTAMP,
            "updatedAt": _CATALOGUE_TIMESTAMP,
        }

    def detail(self) -> JsonObject:
        """The single-item representation: the summary plus `jsonSchema`."""
        return {**self.summary(), "jsonSchema": self.json_schema}


def _load_schema(code: str) -> JsonObject:
    text = resources.files("service.emulator").joinpath("schemas", f"{code}.json").read_text()
    schema: JsonObject = json.loads(text)
    return schema


def _make(code: str, name: str, description: str) -> DocumentType:
    return DocumentType(
        id=f"dt_{code}",
        code=code,
        name=name,
        description=description,
        json_schema=_load_schema(code),
    )


DOCUMENT_TYPES: Final[tuple[DocumentType, ...]] = (
    _make("invoice", "Invoice", "Supplier invoices: parties, line items and totals."),
    _make("receipt", "Receipt", "Point-of-sale receipts: merchant, items and total."),
    _make("id_card", "Identity card", "National identity cards: holder and document data."),
    _make("other", "Other", "Any other document: full text and basic metadata."),
)

_BY_CODE: Final = {t.code: t for t in DOCUMENT_TYPES}
_BY_ID: Final = {t.id: t for t in DOCUMENT_TYPES}


def find_by_code(code: str) -> DocumentType | None:
    """The type whose `codeType` is `code`, or None."""
    return _BY_CODE.get(code)


def find_by_id(type_id: str) -> DocumentType | None:
    """The type with this `id`, or None."""
    return _BY_ID.get(type_id)


def search(query: str | None, *, page: int, limit: int) -> tuple[list[DocumentType], int]:
    """One page of the catalogue filtered by a case-insensitive substring; (items, total)."""
    needle = (query or "").strip().lower()
    matches = [
        t
        for t in DOCUMENT_TYPES
        if not needle
        or needle in t.name.lower()
        or needle in t.code.lower()
        or needle in t.description.lower()
    ]
    start = (page - 1) * limit
    return matches[start : start + limit], len(matches)


# --- generated data -------------------------------------------------------

_COMPANIES: Final = (
    "Acme Corporation",
    "Globex Ltd",
    "Initech SA",
    "Umbrella Supplies",
    "Stark Components",
    "Wayne Logistics",
)
_STREETS: Final = ("Business St", "Market Ave", "Industrial Rd", "Harbour Way", "Main St")
_CITIES: Final = ("Springfield", "Santiago", "Lisbon", "Toronto", "Melbourne")
_PRODUCTS: Final = (
    "Consulting hours",
    "Office chairs",
    "Printer toner",
    "Software licence",
    "Shipping",
    "Maintenance plan",
)
_GROCERIES: Final = ("Coffee", "Bread", "Milk", "Apples", "Pasta", "Cheese", "Water")
_FIRST_NAMES: Final = ("Ana", "Luis", "Maria", "John", "Aiko", "Omar", "Ines", "Pedro")
_LAST_NAMES: Final = ("Silva", "Smith", "Gonzalez", "Tanaka", "Haddad", "Costa", "Rossi")
_COUNTRIES: Final = ("CHL", "PRT", "CAN", "AUS", "JPN", "ESP")
_CURRENCIES: Final = ("USD", "EUR", "CLP", "CAD")
_BASE_DATE: Final = date(2024, 1, 1)


def _money(value: float) -> float:
    return round(value, 2)


def _address(rng: random.Random) -> str:
    return f"{rng.randint(1, 999)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"


def _day(rng: random.Random, *, span_days: int = 365) -> date:
    return _BASE_DATE + timedelta(days=rng.randrange(span_days))


def _invoice(rng: random.Random) -> JsonObject:
    issued = _day(rng)
    lines: list[JsonObject] = []
    amounts: list[float] = []
    for _ in range(rng.randint(1, 4)):
        quantity = rng.randint(1, 10)
        unit_price = _money(rng.uniform(5, 500))
        amounts.append(_money(quantity * unit_price))
        lines.append(
            {
                "description": rng.choice(_PRODUCTS),
                "quantity": quantity,
                "unit_price": unit_price,
                "amount": amounts[-1],
            }
        )
    subtotal = _money(sum(amounts))
    tax = _money(subtotal * 0.16)
    return {
        "invoice_number": f"INV-{issued.year}-{rng.randint(1, 9999):04d}",
        "issue_date": issued.isoformat(),
        "due_date": (issued + timedelta(days=30)).isoformat(),
        "vendor_name": rng.choice(_COMPANIES),
        "vendor_address": _address(rng),
        "vendor_tax_id": f"{rng.randint(10_000_000, 99_999_999)}-{rng.randint(0, 9)}",
        "customer_name": rng.choice(_COMPANIES),
        "customer_address": _address(rng),
        "currency": rng.choice(_CURRENCIES),
        "line_items": lines,
        "subtotal": subtotal,
        "tax": tax,
        "total": _money(subtotal + tax),
    }


def _receipt(rng: random.Random) -> JsonObject:
    items: list[JsonObject] = []
    subtotal = 0.0
    for _ in range(rng.randint(1, 6)):
        quantity = rng.randint(1, 3)
        price = _money(rng.uniform(0.5, 30))
        subtotal += quantity * price
        items.append({"description": rng.choice(_GROCERIES), "quantity": quantity, "price": price})
    subtotal = _money(subtotal)
    tax = _money(subtotal * 0.19)
    return {
        "merchant_name": rng.choice(_COMPANIES),
        "merchant_address": _address(rng),
        "transaction_date": _day(rng).isoformat(),
        "transaction_time": f"{rng.randrange(24):02d}:{rng.randrange(60):02d}",
        "payment_method": rng.choice(("cash", "credit_card", "debit_card", "mobile")),
        "currency": rng.choice(_CURRENCIES),
        "items": items,
        "subtotal": subtotal,
        "tax": tax,
        "total": _money(subtotal + tax),
    }


def _id_card(rng: random.Random) -> JsonObject:
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 55))
    issued = _day(rng, span_days=365 * 5) - timedelta(days=365 * 5)
    country = rng.choice(_COUNTRIES)
    return {
        "document_number": f"{rng.choice('ABCDEFGHJK')}{rng.randint(10_000_000, 99_999_999)}",
        "first_name": rng.choice(_FIRST_NAMES),
        "last_name": rng.choice(_LAST_NAMES),
        "date_of_birth": born.isoformat(),
        "sex": rng.choice(("F", "M", "X")),
        "nationality": country,
        "issuing_country": country,
        "issue_date": issued.isoformat(),
        "expiry_date": (issued + timedelta(days=365 * 10)).isoformat(),
    }


def _other(rng: random.Random) -> JsonObject:
    words = [rng.choice(_PRODUCTS + _GROCERIES).lower() for _ in range(rng.randint(5, 40))]
    return {
        "title": f"Document {rng.randint(1, 9999)}",
        "text": " ".join(words).capitalize() + ".",
        "language": rng.choice(("en", "es", "pt")),
        "page_count": rng.randint(1, 12),
    }


_GENERATORS: Final[dict[str, Callable[[random.Random], JsonObject]]] = {
    "invoice": _invoice,
    "receipt": _receipt,
    "id_card": _id_card,
    "other": _other,
}


def generate_data(code: str, rng: random.Random) -> JsonObject:
    """Plausible extracted data for a known document type, valid against its schema.

    Raises KeyError for an unknown code (callers validate the code on submit).
    """
    return _GENERATORS[code](rng)


def known_codes() -> Sequence[str]:
    """Every `codeType` the emulator accepts, in catalogue order."""
    return tuple(t.code for t in DOCUMENT_TYPES)
