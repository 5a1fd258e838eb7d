"""Stage 1: the encoder registry (``encoders``), checkpoint loading (``checkpoints``) and the
extraction run that writes a store (``run``)."""

#: autocast precisions of ``--precision`` (auto: bf16/fp16 on a GPU, fp32 on the CPU)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
