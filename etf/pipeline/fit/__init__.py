"""Stage 2: fusers and task heads trained from the cache (``train``), and what reads a
trained run: ``predict`` (new images, embeddings), ``explain`` (attention maps)."""
