"""Every error leaves the server as OpenAI's `{"error": {"message", "type", "param", "code"}}`.

The status decides which exception the `openai` SDK raises (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 409 ConflictError, 413), so each user mistake gets the status
the SDK expects; 500 is reserved for our own bugs. A request that fails validation (bad JSON, a
missing or mistyped parameter) is a 400, as at OpenAI, not FastAPI's 422. A 409 carries
`x-should-retry: false`, because the SDK otherwise retries 409s, and a conflict with a job's state
does not go away by asking again.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tuneforge.serve")

_TYPES = {401: "invalid_request_error", 403: "invalid_request_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})
        if status == 409:
            self.headers.setdefault("x-should-retry", "false")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(what: str, param: str) -> APIError:
    """An OpenAI parameter this server does not implement, refused by name (`what`: "tools are", ...)."""
    return APIError(400, f"{what} not supported by this server", param=param, code="unsupported_parameter")


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    code = re.sub(r"\W+", "_", kind) + "_not_found"  # snake_case as all codes are: "fine-tuning job" too
    return APIError(404, f"No {kind} with id '{ident}' found.", param=param, code=code)


def conflict(message: str, code: str | None = None) -> APIError:
    return APIError(409, message, code=code)


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.type, err.param, err.code),
                        status_code=err.status, headers=err.headers)


# pydantic names the branch of a union a value failed in the error's location ("literal['auto']",
# "int", "function-after[...]"): not part of the parameter's name.
_UNION_BRANCHES = {"int", "float", "str", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if not ("[" in p or "'" in p or p in _UNION_BRANCHES)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


# JSON's types in OpenAI's words ("Invalid type for 'temperature': expected a decimal, but got a string
# instead."): what pydantic expected, by its error type, and what the request sent, by the value's type
_EXPECTED = {"int_type": "an integer", "float_type": "a decimal", "bool_type": "a boolean", "string_type": "a string",
             "list_type": "an array", "dict_type": "an object", "model_type": "an object"}
_SENT = {str: "a string", bool: "a boolean", int: "an integer", float: "a decimal", list: "an array", dict: "an object"}


def json_type(value) -> str:
    """What JSON type `value` is, in OpenAI's words ("a string", "an object", ...)."""
    return _SENT.get(type(value), "null")


def _type_only(errors: list[dict]) -> bool:
    return all(e.get("type") in _EXPECTED for e in errors) and type(errors[0].get("input")) in _SENT


def _wrong_type(param: str, errors: list[dict]) -> str:
    expected = list(dict.fromkeys(_EXPECTED[e["type"]] for e in errors))
    if "a decimal" in expected and "an integer" in expected:  # a number: an integer is a decimal too
        expected.remove("an integer")
    return (f"Invalid type for '{param}': expected {' or '.join(expected)}, but got "
            f"{json_type(errors[0]['input'])} instead.")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        if isinstance(err.body, dict) and isinstance(err.body.get("model"), str):
            request.state.model = err.body["model"]  # usage counts the refusal under its model, as other 400s
        errors = err.errors()
        unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:  # OpenAI's answer to a parameter it does not have: 400, naming it
            param = _param_of(tuple(unknown[0].get("loc", ())))
            return JSONResponse(error_body(400, f"Unrecognized request argument supplied: {param}", param=param,
                                           code="unknown_parameter"), status_code=400)
        first = errors[0] if errors else {}
        kind, param = first.get("type", ""), _param_of(tuple(first.get("loc", ())))
        # a union's branches fail one by one ('auto', or an integer): one problem, said once
        same = [e for e in errors if _param_of(tuple(e.get("loc", ()))) == param]
        if kind == "json_invalid":
            param, code = None, "invalid_json"
            msg = ("We could not parse the JSON body of your request. (The request body must be one JSON "
                   f"object: {first.get('ctx', {}).get('error', 'invalid JSON')}.)")
        elif param is None:
            msg, code = "The request body must be a JSON object of the request's parameters.", "invalid_json"
        elif kind == "missing":
            msg, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
        elif len(same) == len(errors) and _type_only(same):  # (a union's branches at other places: said as before)
            code, msg = "invalid_type", _wrong_type(param, same)
        else:
            code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
            msg = f"Invalid value for '{param}': " + ", or ".join(dict.fromkeys(e.get("msg", "invalid") for e in same))
        if len(errors) > len(same):
            msg += f" (and {len(errors) - len(same)} more problem(s))"
        return JSONResponse(error_body(400, msg, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        msg = err.detail if isinstance(err.detail, str) else "Request failed"
        if err.status_code == 404:
            msg = f"Invalid URL ({request.method} {request.url.path})"
        elif err.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(err.status_code, msg), status_code=err.status_code,
                            headers=getattr(err, "headers", None))



def server_error(err: Exception) -> dict:
    """What a client is told of our own bug: the kind of error, not its text, which can carry the
    server's internals (paths, tensor shapes)."""
    return error_body(500, f"The server had an error processing your request ({type(err).__name__}).")


def failed_midstream(request: Request, err: Exception) -> dict:
    """A generation that failed after its streamed answer began (its 200 already sent): logged with
    the traceback, counted as a 500 in usage (UsageMiddleware reads the state), described to the
    client as a failed whole answer is."""
    log.error("generation failed on %s %s", request.method, request.url.path, exc_info=err)
    request.state.status = 500
    return server_error(err)


class ServerErrors:
    """Our own bugs answered inside the app as OpenAI's 500 body. Starlette's handler for Exception
    sits in its outermost middleware and raises the exception again once it has answered (for the
    server to log), and uvicorn then closes the connection: a client's next request on that
    keep-alive connection failed with a connection error. Here the error is logged and answered,
    and the connection stays usable - unless the response had begun, which cannot be finished."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as err:
            if started:
                raise
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=err)
            await JSONResponse(server_error(err), status_code=500)(scope, receive, send)
