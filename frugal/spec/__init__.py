"""Lossless speculative decoding: proposers (prompt lookup, draft model) behind one `Proposer` seam,
one verifier for chains and trees (`verify.verify_tree`), and the per-request adaptive policy and
stats (`decoder.SpecDecoder`) that plug into the engine at construction."""
