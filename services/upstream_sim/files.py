"""The Files API's store (in memory, bounded) and the multipart/form-data upload it takes."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from services.upstream_sim.errors import SimError, invalid_request, not_found

PURPOSES = frozenset({"batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals"})

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(r';\s*([\w*-]+)="((?:[^"\\]|\\.)*)"|;\s*([\w*-]+)=([^;\s]+)')


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


class FileStore:
    def __init__(self, *, max_file_bytes: int, max_stored_bytes: int, max_files: int) -> None:
        self._files: dict[str, StoredFile] = {}
        self._bytes = 0
        self.max_file_bytes = max_file_bytes
        self.max_stored_bytes = max_stored_bytes
        self.max_files = max_files

    def add(self, file_id: str, filename: str, purpose: str, content: bytes) -> StoredFile:
        if len(content) > self.max_file_bytes:
            raise invalid_request(f"The file is {len(content)} bytes; the limit is {self.max_file_bytes}.",
                                  param="file", code="file_too_large")
        if len(self._files) >= self.max_files or self._bytes + len(content) > self.max_stored_bytes:
            raise SimError(507, f"The simulator holds {len(self._files)} files, {self._bytes} bytes, its limit "
                           f"({self.max_files} files, {self.max_stored_bytes} bytes). Delete files "
                           "(DELETE /v1/files/{id}) or restart it.", type="server_error", code="storage_full")
        stored = StoredFile(file_id, filename, purpose, content, int(time.time()))
        self._files[file_id] = stored
        self._bytes += len(content)
        return stored

    def get(self, file_id: str) -> StoredFile:
        stored = self._files.get(file_id)
        if stored is None:
            raise not_found(f"No such File object: {file_id}", code="file_not_found")
        return stored

    def delete(self, file_id: str) -> None:
        stored = self.get(file_id)
        del self._files[file_id]
        self._bytes -= len(stored.content)

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        return [f for f in self._files.values() if purpose is None or f.purpose == purpose]


@dataclass
class FormPart:
    name: str
    filename: str | None
    content: bytes


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """The parts of a multipart/form-data body, by field name (the last one wins)."""
    match = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or match is None:
        raise invalid_request("Upload a file as multipart/form-data with fields 'file' and 'purpose'.")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts: dict[str, FormPart] = {}
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise invalid_request("The multipart body has no parts.")
    for chunk in chunks[1:-1]:
        chunk = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise invalid_request("A multipart part has no header/body separator.")
        disposition = ""
        for line in head.split(b"\r\n"):
            key, _, value = line.decode("utf-8", "replace").partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        params = {}
        for quoted_key, quoted, bare_key, bare in _DISPOSITION_PARAM.findall(disposition):
            params[(quoted_key or bare_key).lower()] = quoted if quoted_key else bare
        if "name" not in params:
            raise invalid_request("A multipart part has no name.")
        parts[params["name"]] = FormPart(params["name"], params.get("filename"), content)
    return parts
