"""The control plane's security rules, in one place so they can be read and reviewed together.

1. Bind: loopback by default; any other address refuses to start without an API token, because a run config
   names files and launches code on the cluster.
2. Token: with one, every mutating route needs `Authorization: Bearer <token>` (constant-time compare).
3. Paths: every path in a posted config must resolve (symlinks followed) under the configured roots, so a
   client can neither read files outside the datasets nor write outside the runs root. A root may be an
   object-storage URI (`s3://bucket/runs`); a URI is under it by prefix, and `..` is refused.
4. Body size: request bodies over 1 MiB are refused with 413 before they are parsed.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from schemas.storage import Location, location_problem

MAX_BODY_BYTES = 1 << 20
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "LAD_API_TOKEN"

# Input files a run reads: allowed under any data root or the runs root (checkpoints live in run directories).
INPUT_PATH_FIELDS = ("data.train", "data.val", "data.image_root", "data.val_image_root", "teacher.checkpoint",
                     "colearn.checkpoint_a", "colearn.checkpoint_b", "model.pretrained", "colearn.model_b.pretrained")
# Datasets must exist when the run is posted; checkpoints may be written by a run queued ahead of this one.
MUST_EXIST_FIELDS = ("data.train", "data.val", "data.image_root", "data.val_image_root")
OUTPUT_PATH_FIELD = "output_dir"  # allowed under the runs root only


class SecurityError(RuntimeError):
    """The server must not start as configured."""


@dataclass
class PathViolation(Exception):
    field: str
    message: str


# ---- bind and token ---------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def load_token(token_file: Optional[str], environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """The API token from `--token-file` (wins) or $LAD_API_TOKEN; None when neither is set."""
    environ = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as e:
            raise SecurityError(f"--token-file {token_file}: cannot read ({e.strerror})") from None
        source = f"--token-file {token_file}"
        if mode & (stat.S_IRWXG | stat.S_IRWXO) and not str(path).startswith("/run/secrets/"):
            logging.getLogger("lad.serve").warning("%s is readable by group/others; chmod 600 it", token_file)
    else:
        token = environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise SecurityError(f"{source}: the token must be at least {MIN_TOKEN_CHARS} characters "
                            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if any(c.isspace() for c in token):
        raise SecurityError(f"{source}: the token must not contain whitespace")
    return token


def check_bind(host: str, token: Optional[str]) -> None:
    if not is_loopback(host) and not token:
        raise SecurityError(f"refusing to listen on {host} without an API token: set ${TOKEN_ENV} or pass "
                            "--token-file (anyone who can reach the port could launch runs)")


def token_matches(expected: str, authorization: Optional[str]) -> bool:
    """`authorization` is the raw header; compared in constant time so timing reveals nothing of the token."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


# ---- paths ------------------------------------------------------------------------------------------------
def _is_under(path: str, root: str) -> bool:
    sep = "/" if Location(root).remote else os.sep
    return path == root or path.startswith(root.rstrip(sep) + sep)


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _exists(where: str) -> bool:
    try:
        return Location(where).exists()
    except OSError:
        return False  # the store cannot be reached: the run could not read it either


class PathPolicy:
    """Resolves config paths against the server's working directory and confines them to the roots."""

    def __init__(self, data_roots: list[str], runs_root: str, base_dir: Optional[str] = None):
        self.base_dir = os.path.realpath(base_dir or os.getcwd())
        self.runs_root = self.resolve(runs_root)
        self.data_roots = [self.resolve(r) for r in data_roots]
        self.input_roots = [*self.data_roots, self.runs_root]

    def resolve(self, path: str) -> str:
        """A local path made absolute and real (symlinks followed); an object-storage URI normalised, with
        no `..` (an object store has no links to follow)."""
        if "\x00" in path:
            raise ValueError("path contains a NUL byte")
        problem = location_problem(path)
        if problem:
            raise ValueError(problem)
        where = Location(path)
        if where.remote:
            if ".." in where.uri.split("://", 1)[1].split("/"):
                raise ValueError(f"{path!r} contains '..'")
            return where.uri
        return os.path.realpath(os.path.join(self.base_dir, os.fspath(where)))

    def confine(self, cfg: dict[str, Any], output_dir_given: bool) -> dict[str, Any]:
        """Return the config with every path field made absolute and real; raise PathViolation on the first
        field that escapes its roots. An unset output_dir becomes the runs root."""
        cfg = json.loads(json.dumps(cfg))  # deep copy of plain JSON data
        for dotted in INPUT_PATH_FIELDS:
            value = _get(cfg, dotted)
            if value is None:
                continue
            real = self._resolve_field(dotted, value)
            if not any(_is_under(real, root) for root in self.input_roots):
                raise PathViolation(dotted, f"{value!r} resolves to {real}, outside the allowed roots "
                                            f"({', '.join(self.input_roots)})")
            if dotted in MUST_EXIST_FIELDS and not _exists(real):
                raise PathViolation(dotted, f"{value!r} does not exist (resolved to {real})")
            _set(cfg, dotted, real)
        if output_dir_given:
            value = cfg.get(OUTPUT_PATH_FIELD)
            real = self._resolve_field(OUTPUT_PATH_FIELD, value)
            if not _is_under(real, self.runs_root):
                raise PathViolation(OUTPUT_PATH_FIELD, f"{value!r} resolves to {real}, outside the runs root "
                                                       f"{self.runs_root}")
            cfg[OUTPUT_PATH_FIELD] = real
        else:
            cfg[OUTPUT_PATH_FIELD] = self.runs_root
        return cfg

    def _resolve_field(self, dotted: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise PathViolation(dotted, "must be a non-empty path")
        try:
            return self.resolve(value)
        except ValueError as e:
            raise PathViolation(dotted, str(e)) from None
