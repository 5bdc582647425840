"""Task names shared by producers and workers, so producers never import worker code."""

INGEST_BATCH = "ragq.ingest_batch"
ANSWER_BATCH = "ragq.answer_batch"
SEARCH = "ragq.search"
STORE_INFO = "ragq.store_info"
EMBED = "ragq.embed"
#: One store call for the process that owns the embedded store (common/remote_store.py).
STORE_CALL = "ragq.store_call"

#: Bounds of one ``ragq.embed`` message (texts, and their characters in all), so a
#: synchronous embedding request stays about as small as an ingest batch.
EMBED_MAX_INPUTS = 256
EMBED_MAX_CHARS = 1_000_000
