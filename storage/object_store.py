"""A store on S3 (`s3://bucket/prefix`): delta-rs storage options and a pyarrow S3 filesystem, both from the standard
AWS environment variables, the objects the store holds besides its tables (checkpoints, views.sql, reports), and the
local folders that stand in for the store's own on this machine (Prefect's home, the warm-start and checkpoint caches).

Credentials are read from the environment when a connection is made and never written anywhere: not into a table,
a log line, views.sql or an error message (`redact`)."""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pa_fs

# The environment variables a store on S3 reads (AWS's own names; delta-rs and pyarrow read the same).
ENDPOINT, KEY_ID, SECRET, TOKEN, REGION, ALLOW_HTTP = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
    "AWS_ALLOW_HTTP",
)  # fmt: skip
CACHE_ENV = "ASYMRE_CACHE"  # this machine's cache of an object store (default ~/.cache/asymre)


class StoreUnreachable(RuntimeError):
    """An object store that cannot be read or written with the environment's settings; the message names the fix."""


def is_remote(root: str) -> bool:
    """Whether a store root (or a URI under it) is on an object store rather than a local folder."""
    return "://" in root and not root.startswith("file://")


def check_scheme(root: str) -> None:
    if is_remote(root) and not root.startswith("s3://"):
        scheme = root.split("://", 1)[0]
        raise StoreUnreachable(
            f"--store {root}: {scheme}:// stores are not supported; give a folder or s3://bucket/prefix"
        )


def split(uri: str) -> tuple[str, str]:
    """("bucket", "key/under/it") of s3://bucket/key/under/it."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def path_of(uri: str) -> str:
    """The path pyarrow's S3 filesystem names `uri` by: bucket/key."""
    return uri.removeprefix("s3://").rstrip("/")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def region() -> str | None:
    return _env(REGION) or _env("AWS_DEFAULT_REGION")


def storage_options() -> dict[str, str]:
    """delta-rs's storage options for the store: the AWS variables that are set, and commits by conditional put.

    Every commit writes its log entry `_delta_log/<version>.json` with `If-None-Match: *`, so of two writers that
    race for one version exactly one succeeds and the other retries on top of it: no lock table (DynamoDB) is
    needed. delta-rs 1.6.6 does this by default; it is set here so that a change of that default cannot undo it."""
    options = {name: value for name in (ENDPOINT, KEY_ID, SECRET, TOKEN) if (value := _env(name))}
    if region():
        options[REGION] = region()
    if _truthy(_env(ALLOW_HTTP)):
        options[ALLOW_HTTP] = "true"
    options["conditional_put"] = "etag"
    return options


def options_for(uri: str) -> dict[str, str] | None:
    """The storage options of a table URI: None for a local table."""
    return storage_options() if is_remote(uri) else None


def filesystem() -> pa_fs.S3FileSystem:
    """pyarrow's S3 filesystem (C++, no Python in its IO threads) with the environment's settings as they are now."""
    return _filesystem(*(_env(name) for name in (ENDPOINT, KEY_ID, SECRET, TOKEN)), region())


@lru_cache(maxsize=4)
def _filesystem(
    endpoint: str | None, key_id: str | None, secret: str | None, token: str | None, region: str | None
) -> pa_fs.S3FileSystem:
    return pa_fs.S3FileSystem(
        access_key=key_id, secret_key=secret, session_token=token, region=region, endpoint_override=endpoint,
        connect_timeout=10, request_timeout=60,
    )  # fmt: skip


def redact(text: str) -> str:
    """`text` with the values of the credential variables replaced by their names (an error message may quote
    a request or the options it was made with)."""
    for name in (SECRET, TOKEN, KEY_ID):
        value = _env(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"${name}")
    return text


# ---- this machine's folders for a store on S3 ---------------------------------------------------------


def cache_root() -> Path:
    """$ASYMRE_CACHE, else $XDG_CACHE_HOME/asymre, else ~/.cache/asymre."""
    if _env(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = _env("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "asymre"


def local_root(store: str) -> Path:
    """The folder that holds what a store keeps on this machine only: the store itself for a local store, else
    <cache>/stores/<bucket>/<prefix> (Prefect's home, the reports as written before they are uploaded, the
    folders checkpoints are written in before they are uploaded)."""
    if not is_remote(store):
        return Path(store)
    bucket, key = split(store)
    return cache_root() / "stores" / bucket / key


# ---- objects --------------------------------------------------------------------------------------------


def check_writable(store: str) -> None:
    """Write and delete one object under the store's prefix; StoreUnreachable naming the setting to fix if that
    fails (no bucket, wrong credentials, no server at the endpoint)."""
    check_scheme(store)
    endpoint = _env(ENDPOINT)
    if endpoint and endpoint.startswith("http://") and not _truthy(_env(ALLOW_HTTP)):
        raise StoreUnreachable(
            f"--store {store}: AWS_ENDPOINT_URL is {endpoint} (plain http); set AWS_ALLOW_HTTP=true to allow it"
        )
    bucket = split(store)[0]
    if not bucket:
        raise StoreUnreachable(f"--store {store}: name a bucket (s3://bucket/prefix)")
    probe = f"{path_of(store)}/.asymre-write-test-{uuid.uuid4().hex}"
    fs = filesystem()
    try:
        info = fs.get_file_info(bucket)
        if info.type == pa_fs.FileType.NotFound:
            raise StoreUnreachable(
                f"--store {store}: bucket {bucket} does not exist at {endpoint or 'AWS S3'}; create it first "
                f"(e.g. `aws s3 mb s3://{bucket}`{' --endpoint-url ' + endpoint if endpoint else ''})"
            )
        with fs.open_output_stream(probe) as out:
            out.write(b"asymre")
        fs.delete_file(probe)
    except OSError as err:
        where = f"the S3 server at {endpoint}" if endpoint else "AWS S3 (AWS_ENDPOINT_URL is not set)"
        reason = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)[:300]
        raise StoreUnreachable(
            f"--store {store}: cannot write to {where} ({reason}); check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_REGION"
        ) from None


def put_bytes(uri: str, data: bytes) -> None:
    """One object, written whole (a single PUT: a reader sees the old object or the new one)."""
    with filesystem().open_output_stream(path_of(uri)) as out:
        out.write(data)


def get_bytes(uri: str) -> bytes:
    with filesystem().open_input_stream(path_of(uri)) as stream:
        return stream.read()


def stamp(uri: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of one object, None if there is none: one HEAD request."""
    info = filesystem().get_file_info(path_of(uri))
    if info.type != pa_fs.FileType.File:
        return None
    return info.size, info.mtime_ns or 0


def listing(uri: str) -> dict[str, int]:
    """Relative name → size of every object under the folder `uri` (empty if there is none)."""
    root = path_of(uri)
    selector = pa_fs.FileSelector(root, recursive=True, allow_not_found=True)
    return {
        info.path[len(root) + 1 :]: info.size
        for info in filesystem().get_file_info(selector)
        if info.type == pa_fs.FileType.File
    }


def folders(uri: str) -> set[str]:
    """The names of the folders (common prefixes) right under the folder `uri`: one listing."""
    selector = pa_fs.FileSelector(path_of(uri), recursive=False, allow_not_found=True)
    return {info.base_name for info in filesystem().get_file_info(selector) if info.type == pa_fs.FileType.Directory}


def holds(uri: str) -> bool:
    """Whether any object lies under the folder `uri`."""
    selector = pa_fs.FileSelector(path_of(uri), recursive=False, allow_not_found=True)
    return bool(filesystem().get_file_info(selector))


def upload_folder(folder: Path, uri: str) -> int:
    """Every file of `folder` as one object under `uri` (same relative names), then the objects under `uri` that
    the folder does not hold are deleted (a folder written again over an older one); returns the files uploaded."""
    fs = filesystem()
    root = path_of(uri)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in names:
        pa_fs.copy_files(str(folder / name), f"{root}/{name}", destination_filesystem=fs)
    for stale in sorted(set(listing(uri)) - set(names)):
        fs.delete_file(f"{root}/{stale}")
    return len(names)


def download_folder(uri: str, folder: Path) -> int:
    """Every object under `uri` into `folder` (made if missing); returns how many (0: nothing is there)."""
    fs = filesystem()
    root = path_of(uri)
    names = listing(uri)
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pa_fs.copy_files(f"{root}/{name}", str(target), source_filesystem=fs)
    return len(names)


def publish(store: str, files: list[Path], under: str) -> list[str]:
    """Upload local files to <store>/<under>/<name> (nothing for a local store); returns their URIs."""
    if not is_remote(store):
        return []
    uris = [f"{store.rstrip('/')}/{under}/{file.name}" for file in files]
    for file, uri in zip(files, uris):
        put_bytes(uri, file.read_bytes())
    return uris
