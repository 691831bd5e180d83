"""The admin API's OpenAPI 3.1 description, served at ``/openapi.json``.

Written as data next to the routes it describes (ops.adminapi); the tests validate it with
openapi-spec-validator and validate real answers against its schemas, so it cannot drift silently.
"""

from __future__ import annotations

from typing import Any

from cocalcproxy import __version__
from cocalcproxy.directory import validate

_NULLABLE_NUMBER = {"type": ["number", "null"]}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": "number", "description": "seconds since the Unix epoch"}
_NULLABLE_TIME = {"type": ["number", "null"], "description": "seconds since the Unix epoch"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _page_of(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": _ref(item)},
            "next_cursor": {
                **_NULLABLE_STRING,
                "description": "pass as ?cursor= for the next page; null on the last page",
            },
        },
    }


def _op(
    op_id: str,
    summary: str,
    ok: tuple[int, str, dict[str, Any]],
    errors: tuple[int, ...],
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    extra_ok: tuple[int, str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {str(ok[0]): _json(ok[2], ok[1])}
    if extra_ok is not None:
        responses[str(extra_ok[0])] = _json(extra_ok[2], extra_ok[1])
    responses.update(_errors(401, *errors))
    operation: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = _body(body)
    if params:
        operation["parameters"] = params
    return operation


_PAGING = [{"$ref": "#/components/parameters/limit"}, {"$ref": "#/components/parameters/cursor"}]


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


_PID = _path_param("pid", _ref("ProjectId"), "a canonical lower-case UUID")
_NAME = _path_param("name", _ref("UserName"), "a user name")
_TOKEN_ID = _path_param("id", _ref("TokenId"), "the token's public id")
_PORT = _path_param("port", {"type": "integer", "minimum": 1, "maximum": 65535}, "a TCP port")


def document() -> dict[str, Any]:
    removed = {
        "type": "object",
        "required": ["removed"],
        "properties": {"removed": {"type": "string"}},
    }
    private = {
        "type": "object",
        "required": ["project", "port", "visibility"],
        "properties": {
            "project": _ref("ProjectId"),
            "port": {"type": "integer"},
            "visibility": {"const": "private"},
        },
    }
    paths: dict[str, Any] = {
        "/v1/users": {
            "get": _op("listUsers", "List users by name", (200, "a page of users",
                       _ref("UserPage")), (400,), params=_PAGING),
            "post": _op("addUser", "Create a user; without a password one is generated and "
                        "returned once", (201, "the new user", _ref("NewUser")),
                        (400, 409, 413, 415, 422), body="UserInput"),
        },
        "/v1/users/{name}": {
            "parameters": [_NAME],
            "get": _op("getUser", "One user", (200, "the user", _ref("User")), (404, 422)),
            "delete": _op("removeUser", "Delete a user with its sessions, tokens and "
                          "collaborations (refused while it owns projects)",
                          (200, "removed", removed), (404, 409, 422)),
        },
        "/v1/users/{name}/password": {
            "parameters": [_NAME],
            "put": _op("setPassword", "Set the password; ends the user's sessions",
                       (200, "done", {"type": "object", "required": ["name"],
                                      "properties": {"name": {"type": "string"}}}),
                       (400, 404, 413, 415, 422), body="PasswordInput"),
        },
        "/v1/users/{name}/oidc-subject": {
            "parameters": [_NAME],
            "put": _op("linkOidcSubject", "Bind the account to an OpenID provider subject, or "
                       "(null) unbind it; ends the user's sessions",
                       (200, "the user", _ref("User")), (400, 404, 409, 413, 415, 422),
                       body="OidcSubjectInput"),
        },
        "/v1/tokens": {
            "get": _op("listTokens", "List API tokens (no secrets) by id",
                       (200, "a page of tokens", _ref("TokenPage")), (400, 404, 422),
                       params=[*_PAGING, {"name": "user", "in": "query", "required": False,
                                          "schema": _ref("UserName")}]),
            "post": _op("createToken", "Create an API token for a user; the secret is "
                        "returned once", (201, "the token", _ref("NewToken")),
                        (400, 404, 413, 415, 422), body="TokenInput"),
        },
        "/v1/tokens/{id}": {
            "parameters": [_TOKEN_ID],
            "delete": _op("revokeToken", "Revoke an API token",
                          (200, "revoked", _ref("Revoked")), (404, 422)),
        },
        "/v1/admin-tokens": {
            "get": _op("listAdminTokens", "List admin API tokens (no secrets) by id",
                       (200, "a page of admin tokens", _ref("AdminTokenPage")), (400,),
                       params=_PAGING),
            "post": _op("createAdminToken", "Create an admin API token; the secret is "
                        "returned once", (201, "the token", _ref("NewAdminToken")),
                        (400, 413, 415, 422), body="AdminTokenInput"),
        },
        "/v1/admin-tokens/{id}": {
            "parameters": [_TOKEN_ID],
            "delete": _op("revokeAdminToken", "Revoke an admin API token",
                          (200, "revoked", _ref("Revoked")), (404, 422)),
        },
        "/v1/projects": {
            "get": _op("listProjects", "List projects by id",
                       (200, "a page of projects", _ref("ProjectPage")), (400,),
                       params=_PAGING),
            "post": _op("addProject", "Create a project (a new id unless one is given)",
                        (201, "the new project", _ref("Project")),
                        (400, 404, 409, 413, 415, 422), body="ProjectInput"),
        },
        "/v1/projects/{pid}": {
            "parameters": [_PID],
            "get": _op("getProject", "One project", (200, "the project", _ref("Project")),
                       (404, 422)),
            "put": _op("putProject", "Make the project exactly this (owner, host, home, title, "
                       "collaborator set), creating it when needed; idempotent",
                       (200, "the project, changed or already so", _ref("Project")),
                       (400, 404, 413, 415, 422), body="ProjectPut",
                       extra_ok=(201, "the project, created", _ref("Project"))),
            "patch": _op("setProject", "Change a project's host, home (null removes it) or "
                         "title", (200, "the project", _ref("Project")),
                         (400, 404, 413, 415, 422), body="ProjectPatch"),
            "delete": _op("removeProject", "Delete a project, its collaborators and shares",
                          (200, "removed", removed), (404, 422)),
        },
        "/v1/projects/{pid}/collaborators/{name}": {
            "parameters": [_PID, _NAME],
            "put": _op("putCollaborator", "Make NAME a collaborator (idempotent)",
                       (200, "the project", _ref("Project")), (404, 409, 422)),
            "delete": _op("removeCollaborator", "Stop NAME reaching the project",
                          (200, "the project", _ref("Project")), (404, 422)),
        },
        "/v1/shares": {
            "get": _op("listShares", "List shared ports by project id and port",
                       (200, "a page of shares", _ref("SharePage")), (400,), params=_PAGING),
        },
        "/v1/projects/{pid}/shares": {
            "parameters": [_PID],
            "get": _op("listProjectShares", "List one project's shared ports",
                       (200, "a page of shares", _ref("SharePage")), (400, 404, 422),
                       params=_PAGING),
        },
        "/v1/projects/{pid}/shares/{port}": {
            "parameters": [_PID, _PORT],
            "put": _op("setShare", "Set a port's visibility. 'link' returns a new secret link "
                       "each time (shown once; the previous link stops working); 'private' "
                       "unshares",
                       (200, "the share", {"oneOf": [_ref("Share"), private]}),
                       (400, 403, 404, 413, 415, 422), body="ShareInput"),
            "delete": _op("removeShare", "Make a shared port private again",
                          (200, "now private", private), (404, 422)),
        },
    }  # fmt: skip
    schemas: dict[str, Any] = {
        "UserName": {
            "type": "string",
            "pattern": r"^[A-Za-z0-9._@][A-Za-z0-9._@-]{0,63}$",
        },
        "ProjectId": {
            "type": "string",
            "pattern": r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        },
        "TokenId": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "User": {
            "type": "object",
            "required": ["id", "name"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "integer"},
                "name": _ref("UserName"),
                "oidc_subject": {"type": "string", "description": "bound provider subject"},
                "email": {"type": "string", "description": "from the provider"},
            },
        },
        "NewUser": {
            "type": "object",
            "required": ["id", "name"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "integer"},
                "name": _ref("UserName"),
                "password": {"type": "string", "description": "only when generated"},
                "oidc_subject": {"type": "string", "description": "bound provider subject"},
                "email": {"type": "string", "description": "from the provider"},
            },
        },
        "UserInput": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": _ref("UserName"),
                "password": {"type": "string", "minLength": 1},
                "oidc_subject": {
                    "type": "string",
                    "description": "bind to this provider subject; without a password the "
                    "account signs in only with the provider",
                },
            },
        },
        "OidcSubjectInput": {
            "type": "object",
            "required": ["oidc_subject"],
            "additionalProperties": False,
            "properties": {"oidc_subject": _NULLABLE_STRING},
        },
        "PasswordInput": {
            "type": "object",
            "required": ["password"],
            "additionalProperties": False,
            "properties": {"password": {"type": "string", "minLength": 1}},
        },
        "Token": {
            "type": "object",
            "required": ["id", "user", "created", "expires"],
            "additionalProperties": False,
            "properties": {
                "id": _ref("TokenId"),
                "user": _ref("UserName"),
                "created": _TIME,
                "expires": _NULLABLE_TIME,
            },
        },
        "NewToken": {
            "type": "object",
            "required": ["id", "user", "created", "expires", "token"],
            "additionalProperties": False,
            "properties": {
                "id": _ref("TokenId"),
                "user": _ref("UserName"),
                "created": _TIME,
                "expires": _NULLABLE_TIME,
                "token": {"type": "string"},
            },
        },
        "TokenInput": {
            "type": "object",
            "required": ["user"],
            "additionalProperties": False,
            "properties": {
                "user": _ref("UserName"),
                "expires_in_days": {**_NULLABLE_NUMBER, "exclusiveMinimum": 0, "maximum": 36500},
            },
        },
        "AdminToken": {
            "type": "object",
            "required": ["id", "description", "created", "expires"],
            "additionalProperties": False,
            "properties": {
                "id": _ref("TokenId"),
                "description": {"type": "string"},
                "created": _TIME,
                "expires": _NULLABLE_TIME,
            },
        },
        "NewAdminToken": {
            "type": "object",
            "required": ["id", "description", "created", "expires", "token"],
            "additionalProperties": False,
            "properties": {
                "id": _ref("TokenId"),
                "description": {"type": "string"},
                "created": _TIME,
                "expires": _NULLABLE_TIME,
                "token": {"type": "string"},
            },
        },
        "AdminTokenInput": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "description": {"type": "string", "maxLength": validate.DESCRIPTION_MAX},
                "expires_in_days": {**_NULLABLE_NUMBER, "exclusiveMinimum": 0, "maximum": 36500},
            },
        },
        "Revoked": {
            "type": "object",
            "required": ["revoked"],
            "properties": {"revoked": _ref("TokenId")},
        },
        "Project": {
            "type": "object",
            "required": [
                "id",
                "owner",
                "host",
                "home",
                "title",
                "collaborators",
                "ports",
                "socket_dir",
                "socket_owner",
            ],
            "additionalProperties": False,
            "properties": {
                "id": _ref("ProjectId"),
                "owner": _ref("UserName"),
                "host": {"type": "string"},
                "home": _NULLABLE_STRING,
                "title": {"type": "string"},
                "collaborators": {"type": "array", "items": _ref("UserName")},
                "ports": {
                    **_NULLABLE_STRING,
                    "description": "ports the routes may reach, e.g. 8000-8099,8888; null: the "
                    "proxy's --default-ports",
                },
                "socket_dir": {
                    **_NULLABLE_STRING,
                    "description": "serve ports from the Unix sockets <socket_dir>/<port>",
                },
                "socket_owner": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "ProjectInput": {
            "type": "object",
            "required": ["owner"],
            "additionalProperties": False,
            "properties": {
                "owner": _ref("UserName"),
                "host": {"type": "string", "default": "127.0.0.1"},
                "home": _NULLABLE_STRING,
                "id": _ref("ProjectId"),
                "title": {"type": "string", "maxLength": validate.TITLE_MAX},
                "ports": {
                    **_NULLABLE_STRING,
                    "description": "ports the routes may reach, e.g. 8000-8099,8888; null: the "
                    "proxy's --default-ports",
                },
                "socket_dir": {
                    **_NULLABLE_STRING,
                    "description": "serve ports from the Unix sockets <socket_dir>/<port>",
                },
                "socket_owner": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "ProjectPut": {
            "type": "object",
            "required": ["owner"],
            "additionalProperties": False,
            "properties": {
                "owner": _ref("UserName"),
                "host": {"type": "string", "default": "127.0.0.1"},
                "home": _NULLABLE_STRING,
                "title": {"type": "string", "maxLength": validate.TITLE_MAX},
                "collaborators": {"type": "array", "items": _ref("UserName")},
                "ports": {
                    **_NULLABLE_STRING,
                    "description": "ports the routes may reach, e.g. 8000-8099,8888; null: the "
                    "proxy's --default-ports",
                },
                "socket_dir": {
                    **_NULLABLE_STRING,
                    "description": "serve ports from the Unix sockets <socket_dir>/<port>",
                },
                "socket_owner": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "ProjectPatch": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "host": {"type": "string"},
                "home": _NULLABLE_STRING,
                "title": {"type": "string", "maxLength": validate.TITLE_MAX},
                "ports": {
                    **_NULLABLE_STRING,
                    "description": "ports the routes may reach, e.g. 8000-8099,8888; null: the "
                    "proxy's --default-ports",
                },
                "socket_dir": {
                    **_NULLABLE_STRING,
                    "description": "serve ports from the Unix sockets <socket_dir>/<port>",
                },
                "socket_owner": {"type": ["integer", "null"], "minimum": 0},
            },
        },
        "Share": {
            "type": "object",
            "required": ["project", "port", "visibility", "created", "expires"],
            "additionalProperties": False,
            "properties": {
                "project": _ref("ProjectId"),
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "visibility": {"enum": ["link", "public"]},
                "created": _TIME,
                "expires": _NULLABLE_TIME,
                "url": {"type": "string", "description": "where the port is served"},
                "secret": {"type": "string", "description": "a link share's secret, once"},
                "link": {"type": "string", "description": "the link to hand out, once"},
            },
        },
        "ShareInput": {
            "type": "object",
            "required": ["visibility"],
            "additionalProperties": False,
            "properties": {
                "visibility": {"enum": list(validate.VISIBILITIES)},
                "expires_in_days": {**_NULLABLE_NUMBER, "exclusiveMinimum": 0, "maximum": 36500},
            },
        },
        "UserPage": _page_of("User"),
        "TokenPage": _page_of("Token"),
        "AdminTokenPage": _page_of("AdminToken"),
        "ProjectPage": _page_of("Project"),
        "SharePage": _page_of("Share"),
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {
                            "type": "string",
                            "enum": [
                                "bad_json",
                                "bad_query",
                                "invalid_cursor",
                                "unexpected_body",
                                "unauthorized",
                                "forbidden",
                                "not_found",
                                "method_not_allowed",
                                "conflict",
                                "body_too_large",
                                "unsupported_media_type",
                                "invalid_input",
                                "internal",
                                "unavailable",
                            ],
                        },
                        "message": {"type": "string"},
                    },
                }
            },
        },
    }
    reasons = {
        400: "malformed request (bad_json, bad_query, invalid_cursor, unexpected_body)",
        401: "no valid admin token (unauthorized)",
        403: "the proxy's policy forbids it (forbidden)",
        404: "no such user, project, token or path (not_found)",
        405: "the path does not take this method (method_not_allowed)",
        409: "conflicts with what exists (conflict)",
        413: "the body is larger than 64 KiB (body_too_large)",
        415: "the body is not application/json (unsupported_media_type)",
        422: "a value the command would refuse, an unknown field or a wrong type (invalid_input)",
    }
    responses = {f"E{status}": _json(_ref("Error"), text) for status, text in reasons.items()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cocalcproxy admin API",
            "version": __version__,
            "description": (
                "Drive the cocalcproxy directory from code: users, API tokens, projects, "
                "collaborators, shared ports and admin tokens. The same operations as the "
                "cocalcproxy command; every change reaches running proxies within 2 seconds. "
                "Every request carries Authorization: Bearer <admin token>."
            ),
        },
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "limit": {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
                "cursor": {
                    "name": "cursor",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "next_cursor from the previous page",
                },
            },
            "schemas": schemas,
            "responses": responses,
        },
    }
