"""Pipeline storage on an object store (s3://, gs://, any URI pyarrow.fs knows), through a local mirror.

Design, in short:
- Stages only ever see local directories (tasks know nothing of this module). With
  `storage: s3://bucket/run` they run in a local mirror of it: $UNCLIP_LOCAL_MIRROR, else
  `~/.cache/unclip/mirror-<hash of the URI>` (`$XDG_CACHE_HOME` is honoured).
- The store is the truth. A stage is finished iff `<uri>/<stage>/_manifest.json` exists in the
  store; skip/resume reads the store's manifests, so a fresh machine with an empty mirror skips
  what is done and downloads only the finished inputs of the stages it runs (`pull`).
- Object stores have no rename, so a stage is published in an order that never shows partial
  output as finished (`publish`): delete the old manifest, delete the old objects, upload the
  stage directory, then write the manifest last and read it back. A crash at any point leaves
  no manifest (or, before publishing starts, the previous finished one with its own objects).
- Credentials come from the environment only, as pyarrow reads them: for S3 AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role) and AWS_ENDPOINT_URL for an
  S3-compatible store (MinIO, Ceph, ...); for GCS the Google default credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from pipelines.config import ConfigError
from tasks.context import MANIFEST, one_line

MIRROR_ENV = "UNCLIP_LOCAL_MIRROR"
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CREDENTIALS_FIX = ("credentials and endpoint come from the environment only: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                   "and, for an S3-compatible store, AWS_ENDPOINT_URL (for gs://: GOOGLE_APPLICATION_CREDENTIALS)")


def credentials_fix(uri: str) -> str:
    """CREDENTIALS_FIX, saying so when an s3:// URI meets an environment without AWS credentials."""
    if uri.startswith("s3://") and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        return f"{CREDENTIALS_FIX}; AWS_ACCESS_KEY_ID is not set"
    return CREDENTIALS_FIX


class ObjectStoreError(RuntimeError):
    """The store failed while the run was going (network, permissions); the message names the URI."""


def is_remote(storage: str) -> bool:
    """A URI with a scheme (s3://, gs://, ...) other than file://: storage on an object store."""
    match = _URI.match(storage)
    return bool(match) and match.group(1).lower() != "file"


def local_mirror(uri: str) -> Path:
    """Where the stages of a run stored at `uri` run on this machine."""
    if os.environ.get(MIRROR_ENV):
        return Path(os.environ[MIRROR_ENV]).expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "unclip" / f"mirror-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}"


def local_storage(storage: str) -> Path:
    """The directory stages write to: the storage path itself, or the local mirror of a store URI."""
    return local_mirror(storage) if is_remote(storage) else Path(storage).absolute()


def store_problems(uri: str) -> list[str]:
    """Why a run cannot use `uri` as its storage (unknown scheme, unreachable, not writable), or []."""
    try:
        store = ObjectStore.connect(uri)
        store.check_writable()
    except ConfigError as e:
        return [str(e)]
    return []


class ObjectStore:
    """A run's storage root on an object store: manifests, pulls and publishes of stage directories."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str):
        self.uri, self.fs, self.root = uri.rstrip("/"), fs, root.rstrip("/")

    @classmethod
    def connect(cls, uri: str) -> ObjectStore:
        """ConfigError (CLI exit 2) naming the URI and the fix when pyarrow cannot open or reach it."""
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # ArrowInvalid for an unknown scheme, OSError for a bad bucket/region
            scheme = uri.partition("://")[0]
            if "Unrecognized filesystem type" in str(e):
                raise ConfigError(f"storage {uri}: pyarrow has no file system for {scheme}:// URIs; use s3://bucket/path, "
                                  "gs://bucket/path (or another URI pyarrow.fs knows) or a local directory with --storage") from None
            raise ConfigError(f"storage {uri}: cannot open it ({one_line(e)}); {credentials_fix(uri)}") from None
        store = cls(uri, fs, root)
        try:
            info = fs.get_file_info(store.root)
        except Exception as e:
            raise ConfigError(f"storage {uri}: cannot reach the store ({one_line(e)}); check that it is up and the "
                              f"bucket exists; {credentials_fix(uri)}") from None
        if info.type == pafs.FileType.File:
            raise ConfigError(f"storage {uri}: is an object (a file), not a folder; pass a folder URI with --storage")
        return store

    def check_writable(self) -> None:
        """Write and delete a probe object: only a real write tells about buckets, permissions and quotas."""
        probe = f"{self.root}/.unclip-write-check-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as e:
            raise ConfigError(f"storage {self.uri}: cannot write there ({one_line(e)}); create the bucket or pick "
                              f"a writable one; {credentials_fix(self.uri)}") from None

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest in the store, or None when the stage has not finished there."""
        try:
            with self.fs.open_input_stream(self.path(stage, MANIFEST)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable manifest: the stage is not finished
            return None
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: cannot read {stage}/{MANIFEST} ({one_line(e)})") from None

    def pull(self, stage: str, local_dir: Path) -> None:
        """Make `local_dir` a copy of the stage's finished output in the store (unless it is one already).
        Downloads next to it first, so an interrupted pull never looks like a finished stage."""
        remote = self.read_manifest(stage)
        if remote is None:
            raise ObjectStoreError(f"storage {self.uri}: {stage} has no {MANIFEST}; it is not finished there")
        if _local_manifest(local_dir) == remote:
            return
        tmp = local_dir.with_name(f".{local_dir.name}.pull")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            pafs.copy_files(self.path(stage), str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: downloading {stage}/ failed ({one_line(e)})") from None
        if _local_manifest(tmp) != remote:  # republished meanwhile: what we have is not that manifest's output
            raise ObjectStoreError(f"storage {self.uri}: {stage}/ changed while it was downloaded; run again")
        shutil.rmtree(local_dir, ignore_errors=True)
        os.replace(tmp, local_dir)

    def unpublish(self, stage: str, keep: tuple[str, ...] = ()) -> None:
        """Remove the stage's manifest from the store (first), then its objects but the top-level `keep` names."""
        try:
            self.fs.delete_file(self.path(stage, MANIFEST))
        except FileNotFoundError:
            pass
        if not keep:
            self.fs.delete_dir_contents(self.path(stage), missing_dir_ok=True)
            return
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(stage), allow_not_found=True)):
            if info.base_name not in keep:
                self._remove(info)

    def publish(self, stage: str, local_dir: Path, manifest: str, local_only: tuple[str, ...] = (),
                keep: tuple[str, ...] = ()) -> None:
        """Upload a finished stage: old manifest and objects out, the directory in, the manifest last,
        then read back. `local_only`: top-level names that stay on this machine (runner markers);
        `keep`: top-level names that only the store has (a training stage's checkpoints) and that stay."""
        try:
            self.unpublish(stage, keep=keep)
            pafs.copy_files(str(local_dir), self.path(stage), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            for name in local_only:
                if (local_dir / name).exists():
                    self.fs.delete_file(self.path(stage, name))
            self._write_and_verify(f"{stage}/{MANIFEST}", manifest)
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: uploading {stage}/ failed ({one_line(e)}); it has no "
                                   f"{MANIFEST} there, so the next run redoes it") from None

    def read_text(self, relpath: str) -> str | None:
        """One object's text (e.g. `_pipeline/retrain.json`), or None when the store has no such object."""
        try:
            with self.fs.open_input_stream(self.path(relpath)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: cannot read {relpath} ({one_line(e)})") from None

    def delete(self, relpath: str) -> None:
        """Remove a folder (or object) from the store, if it is there."""
        try:
            self._remove(self.fs.get_file_info(self.path(relpath)))
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: deleting {relpath} failed ({one_line(e)})") from None

    def _remove(self, info: pafs.FileInfo) -> None:
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def upload(self, local: Path, relpath: str) -> None:
        """Copy a local file or folder to `relpath` in the store."""
        try:
            pafs.copy_files(str(local), self.path(relpath), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: uploading {relpath} failed ({one_line(e)})") from None

    def download(self, relpath: str, local: Path) -> None:
        """Copy `relpath` (a file or a folder) from the store to `local`, through a temporary name
        so an interrupted download is never taken for the whole."""
        tmp = local.with_name(f".{local.name}.pull")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(self.path(relpath), str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: downloading {relpath} failed ({one_line(e)})") from None
        os.replace(tmp, local)

    def write_text(self, relpath: str, text: str) -> None:
        """Write one object (e.g. `_pipeline/config.yaml`) and read it back."""
        try:
            self._write_and_verify(relpath, text)
        except OSError as e:
            raise ObjectStoreError(f"storage {self.uri}: writing {relpath} failed ({one_line(e)})") from None

    def _write_and_verify(self, relpath: str, text: str) -> None:
        """The write is only trusted once the store returns what was written."""
        path = self.path(relpath)
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())
        with self.fs.open_input_stream(path) as f:
            if f.read() != text.encode():
                raise OSError(f"{relpath} reads back different from what was written")


def _local_manifest(local_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((local_dir / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None
