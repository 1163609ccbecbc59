"""The API's vocabulary and request schema, shared by the daemon, the CLI and the client SDK.

A leaf: imports nothing else of sandkasten and does no I/O (an import-linter contract), so the
pure domain, the kernel-side runtime and the client SDK may all use it.

- `vocabulary`: statuses (`StrEnum`s, each kind with its one `ENDED` set), typed ids and the
  patterns ids and tokens must match. Standard library only.
- `requests`: one `msgspec.Struct` per JSON request body; the daemon's intake validates
  through them, `/openapi.json` describes its request bodies with them, the client builds its
  bodies with them.
- `config`: the config's sections (`defaults:`, `limits:`, ...) as `msgspec.Struct`s;
  `sandkasten.config` converts `sandkasten.yaml` and `SANDKASTEN_*` through them, so requests
  and the config are validated the same way.

Nothing is imported here, so `import sandkasten.schema.vocabulary` does not load msgspec.
"""
