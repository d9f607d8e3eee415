"""Offline training: the byte-level BPE tokenizer trainer, the decoder trainer (`frugal train lm`)
and the evaluation that writes model cards. Nothing here is imported by the inference engine."""
