"""Body stores (local files, S3-compatible), all behind one interface (`base.BodyStore`)."""

from llmtap.bodies.base import BodyStore, body_key, open_body_store

__all__ = ["BodyStore", "body_key", "open_body_store"]
