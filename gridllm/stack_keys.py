"""The API keys of a stack ``gridllm up`` starts.

The router never sees a key on its command line (where ``ps`` and the launcher's log would
show it): the launcher hashes every configured key (``--api-key``, ``$GRIDLLM_API_KEY``,
``--api-key-file``) into a key file of digests, readable by the user only, in the stack's log
directory, and passes that file to the router. It adds one key of its own, drawn at start and
held in memory only, for the calls it makes itself (waiting until every worker is linked).
"""

from __future__ import annotations

import logging
import os
import secrets

from gridllm.common.auth import ApiKey, KeyRing, bearer_metadata, key_digest, load_keys

logger = logging.getLogger(__name__)

# The tenant of the launcher's own key.
LAUNCHER_TENANT = "gridllm-up"
_KEY_FILE_NAME = "router-api-keys"


class StackKeys:
    """Args:
        api_keys: the keys given as flags.
        api_key_file: a key file (``KEY [TENANT]`` per line), or None.
    Raises:
        ValueError: a bad key or key-file line (named).
    """

    def __init__(self, api_keys: list[str], api_key_file: str | None):
        keys = load_keys(api_keys, api_key_file)
        self.launcher_key = secrets.token_urlsafe(32) if keys else None
        if self.launcher_key is not None:
            keys.append(ApiKey(key_digest(self.launcher_key), LAUNCHER_TENANT))
        self.keyring = KeyRing(keys)

    @property
    def is_enabled(self) -> bool:
        return self.keyring.is_enabled

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What the launcher's own calls to the router send."""
        return bearer_metadata(self.launcher_key)

    def router_args(self, log_dir: str) -> list[str]:
        """``--api-key-file`` of the digests, written now (nothing without keys)."""
        if not self.is_enabled:
            return []
        path = os.path.join(log_dir, _KEY_FILE_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.keyring.to_lines())
        return ["--api-key-file", path]
