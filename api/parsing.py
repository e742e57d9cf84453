"""Turn untrusted request bodies into typed values (query parameters and path ids are typed on the handlers).

Every failure becomes a 400 VALIDATION_ERROR whose details name the field, so no input can reach a
500. Bodies are decoded with msgspec directly (strict types, unknown fields refused, camelCase names,
the `msgspec.Meta` constraints declared on the Struct); handlers receive them as a typed `data:`
through `JsonBody`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile
from litestar.dto import AbstractDTO, DTOFieldDefinition
from litestar.exceptions import HTTPException
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from api.openapi import body_schema
from shared.errors import KilnError, PayloadTooLarge, ValidationFailed
from shared.jsonlimits import JSON_DEPTH_LIMIT, format_path, too_deep_path, too_deep_path_in_text

T = TypeVar("T")

_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD_IN_MESSAGE = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]+)`")


def _field_of(message: str) -> tuple[str, str]:
    """msgspec's "Expected `str`, got `int` - at `$.meta.x`" → ("meta.x", "Expected `str`, got `int`")."""
    match = _AT_PATH.match(message)
    assert match is not None  # the pattern matches any string
    text, path = match["message"], (match["path"] or "").lstrip(".")
    if named := _FIELD_IN_MESSAGE.search(text):
        path = f"{path}.{named['name']}" if path else named["name"]
    return path or "body", text


def decode_body(body: bytes, type_: type[T]) -> T:
    if not body.strip():
        raise ValidationFailed.field("body", "a JSON object is required")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        errors = _every_bad_field(body, type_) or [_field_of(str(exc))]
        details = [{"field": field, "message": message} for field, message in errors]
        raise ValidationFailed(f"{errors[0][0]}: {errors[0][1]}", details=details) from None
    except msgspec.DecodeError as exc:
        raise ValidationFailed.field("body", f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ValidationFailed.field("body", "malformed JSON: not valid UTF-8") from None
    except RecursionError:  # msgspec gives up past ~1000 levels; name the field that goes that deep
        path = too_deep_path_in_text(body, JSON_DEPTH_LIMIT)
        field = _deep_field(path or [])
        raise ValidationFailed.field(field, f"must not nest deeper than {JSON_DEPTH_LIMIT} levels") from None


def _every_bad_field(body: bytes, type_: type[Any]) -> list[tuple[str, str]]:
    """msgspec stops at the first bad field; a client fixing a body wants them all. Only on the error
    path: each member of the (valid JSON) object is checked against its field's type on its own."""
    if not (isinstance(type_, type) and issubclass(type_, msgspec.Struct)):
        return []
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return []
    if not isinstance(value, dict):
        return []
    errors: list[tuple[str, str]] = []
    fields = msgspec.structs.fields(type_)
    known = {field.encode_name for field in fields}
    if type_.__struct_config__.forbid_unknown_fields:
        errors.extend(
            (name, f"Object contains unknown field `{name}`") for name in value if name not in known
        )
    for field in fields:
        if field.encode_name not in value:
            if field.required:
                errors.append((field.encode_name, f"Object missing required field `{field.encode_name}`"))
            continue
        try:
            msgspec.convert(value[field.encode_name], field.type, strict=True)
        except msgspec.ValidationError as exc:
            path, message = _field_of(str(exc))
            if path == "body":
                path = field.encode_name
            else:  # `items[3].prompt`, `meta.x`
                path = f"{field.encode_name}{'' if path.startswith('[') else '.'}{path}"
            errors.append((path, message))
    return errors


def _struct_of(field_definition: FieldDefinition) -> Any:
    """`Struct` of `data: Struct`, or of `data: Struct | None = None` (a body that may be left out)."""
    if field_definition.is_optional:
        return next(arg for arg in field_definition.args if arg is not type(None))
    return field_definition.annotation


class JsonBody(AbstractDTO[Any]):
    """Litestar's `data:` for a msgspec Struct body, decoded by `decode_body` (strict, every bad field
    named in our envelope) instead of Litestar's lax conversion, and documented with msgspec's JSON
    Schema of the same Struct, so the Meta constraints validate and document from one place.

        @post(..., dto=JsonBody, return_dto=None)
        async def create(self, data: CreateThingRequest) -> ...
    """

    _types: ClassVar[dict[str, Any]] = {}

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # no transfer model: the Struct is decoded as it is

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        if field_definition.name == "data":
            cls._types[handler_id] = _struct_of(field_definition)

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Reference | Schema:
        struct = _struct_of(field_definition)
        if hasattr(struct, "documented_schema"):  # limits from settings: the app documents it (api.app)
            return Reference(ref=f"#/components/schemas/{struct.__name__}")
        return body_schema(struct)  # type: ignore[return-value]  # a JSON Schema, serialized as it is

    def decode_bytes(self, value: bytes) -> Any:
        return decode_body(value, self._types[self.asgi_connection.route_handler.handler_id])


def check_text(value: str | None, field: str, *, max_length: int, required: bool = False) -> str | None:
    """Trimmed text within limits; NUL is refused because PostgreSQL text cannot hold it."""
    if value is None:
        return None
    value = value.strip()
    if required and not value:
        raise ValidationFailed.field(field, "must not be empty")
    if len(value) > max_length:
        raise ValidationFailed.field(field, f"must be at most {max_length} characters (got {len(value)})")
    if "\x00" in value:
        raise ValidationFailed.field(field, "must not contain NUL characters")
    return value


def _deep_field(path: list[str | int]) -> str:
    """A too-deep path named down to its second key (`parameters.rawRequestOverride`, `meta.a`)."""
    keys, cut = 0, len(path)
    for index, part in enumerate(path):
        keys += isinstance(part, str)
        if keys == 2:
            cut = index + 1
            break
    return format_path(path[:cut]) or "body"


def check_json_object(value: dict[str, Any], field: str, *, max_bytes: int) -> dict[str, Any]:
    """A free-form JSON object that PostgreSQL's jsonb will store as sent, at most JSON_DEPTH_LIMIT deep
    (checked first: encoding a deeper one recurses)."""
    path = too_deep_path(value, JSON_DEPTH_LIMIT)
    if path is not None:
        where = format_path([field, *path[:1]])
        raise ValidationFailed.field(where, f"must not nest deeper than {JSON_DEPTH_LIMIT} levels")
    encoded = msgspec.json.encode(value)
    if len(encoded) > max_bytes:
        message = f"must be at most {max_bytes} bytes as JSON (got {len(encoded)})"
        details = [{"field": field, "message": message}]
        if value:  # also name the member that makes it big (a pasted workflow, a huge override string)
            sizes = {key: len(msgspec.json.encode(member)) for key, member in value.items()}
            largest = max(sizes, key=lambda key: sizes[key])
            details.append(
                {"field": f"{field}.{largest}", "message": f"the largest member: {sizes[largest]} bytes"}
            )
        raise ValidationFailed(f"{field}: {message}", details=details)
    if b"\\u0000" in encoded:
        raise ValidationFailed.field(field, "must not contain NUL characters")
    return value


# --- multipart/form-data -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MultipartForm:
    texts: dict[str, str]
    files: dict[str, bytes]


async def read_multipart(
    request: Request[Any, Any, Any],
    *,
    files: Sequence[str],
    texts: Sequence[str],
    max_body_bytes: int,
    max_file_bytes: int,
    too_large: Callable[[], KilnError],
) -> MultipartForm:
    """A multipart/form-data body, checked: only the named parts, each at most once, files as file
    parts of at most `max_file_bytes`, texts as UTF-8 text. Every failure is a 400 naming the part, or
    `too_large()` (a 413) for a body past `max_body_bytes` (refused before reading when announced)."""
    content_type, _ = request.content_type
    if content_type != "multipart/form-data":
        raise ValidationFailed.field(files[0], f"send multipart/form-data with a `{files[0]}` file part")
    announced = request.headers.get("content-length")
    if announced and announced.isdigit() and int(announced) > max_body_bytes:
        raise too_large()
    try:
        await request.body()  # the whole body, under the route's limit (also on the bytes received)
        form = await request.form()
    except HTTPException as exc:
        if exc.status_code == 413:
            raise too_large() from None
        raise ValidationFailed.field("body", f"malformed multipart/form-data: {exc.detail}") from None
    except (UnicodeDecodeError, LookupError):  # a text part in a charset we cannot decode
        raise ValidationFailed.field("body", "text fields must be UTF-8") from None
    opened = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    known = (*files, *texts)
    try:
        if unknown := sorted({name for name in form if name not in known}):
            raise ValidationFailed.field(unknown[0], f"unknown field; send only {', '.join(known)}")
        found = MultipartForm({}, {})
        for name in known:
            values = form.getall(name, [])
            if len(values) > 1:
                raise ValidationFailed.field(name, "given more than once")
            if not values:
                continue
            value = values[0]
            if name in files:
                if not isinstance(value, UploadFile):
                    raise ValidationFailed.field(
                        name, "must be a file part (with a filename), not a text field"
                    )
                data = await value.read(max_file_bytes + 1)
                if len(data) > max_file_bytes:
                    raise PayloadTooLarge(
                        f"{name}: larger than {max_file_bytes} bytes",
                        details=[{"field": name, "message": f"must be at most {max_file_bytes} bytes"}],
                    )
                found.files[name] = data
            elif isinstance(value, UploadFile):
                raise ValidationFailed.field(name, "must be text")
            else:
                found.texts[name] = value
    finally:
        for file in opened:
            await file.close()
    return found
