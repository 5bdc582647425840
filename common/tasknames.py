"""Task names shared by producers and workers, so producers never import worker code."""

INGEST_BATCH = "ragq.ingest_batch"
ANSWER_BATCH = "ragq.answer_batch"
SEARCH = "ragq.search"
STORE_INFO = "ragq.store_info"
#: Build the store's vector index now (``ragq optimize``); routed like STORE_INFO.
STORE_OPTIMIZE = "ragq.store_optimize"
EMBED = "ragq.embed"
#: One message of a ``/v1/embeddings`` batch's lines (a job of kind ``embeddings``).
EMBED_BATCH = "ragq.embed_batch"
#: Lines of one ``ragq.embed_batch`` message (and at most RAGQ_BATCH_BYTES of their inputs).
EMBED_BATCH_LINES = 64
#: Delete documents by a payload filter, or a sync's stale ones (common/deletion.py).
DELETE_DOCUMENTS = "ragq.delete_documents"
#: One store call for the process that owns the embedded store (common/remote_store.py).
STORE_CALL = "ragq.store_call"

#: Bounds of one ``ragq.embed`` message (texts, and their characters in all), so a
#: synchronous embedding request stays about as small as an ingest batch.
EMBED_MAX_INPUTS = 256
EMBED_MAX_CHARS = 1_000_000

#: ``ragq reindex``: list the live collection's documents and name the target (one call).
REINDEX_PLAN = "ragq.reindex_plan"
#: One page of a re-index job's documents, rebuilt into the target; the last one switches.
REINDEX_BATCH = "ragq.reindex_batch"
#: ``ragq reindex --drop-old``: delete the collections the pointer left (the store's owner).
REINDEX_DROP_OLD = "ragq.reindex_drop_old"
