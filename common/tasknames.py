"""Task names shared by producers and workers, so producers never import worker code."""

INGEST_BATCH = "ragq.ingest_batch"
ANSWER_BATCH = "ragq.answer_batch"
SEARCH = "ragq.search"
STORE_INFO = "ragq.store_info"
