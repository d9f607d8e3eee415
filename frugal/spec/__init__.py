"""Lossless speculative decoding: proposers (prompt lookup, draft model) behind one `Proposer` seam,
one verifier for chains and token trees (`verify.verify_tree`; trees are verified in one target pass,
see `proposer.py`), and the per-request adaptive policy and
stats (`decoder.SpecDecoder`) that plug into the engine at construction."""
