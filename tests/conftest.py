"""Session fixtures shared by every test package."""

from tests.redis_fixture import redis_server  # noqa: F401 - re-exported fixture
