"""Stage 1: the encoder registry (``encoders``), checkpoint loading (``checkpoints``) and the
extraction run that writes a store (``run``)."""
