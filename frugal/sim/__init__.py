"""Trace replay and discrete-event simulation of the engine's scheduling (FastServe, issue 8).

`replay` runs a request trace through the real EngineCore (arrivals on a clock that skips idle
gaps); `simulator` replays it through the real Scheduler and policies with a virtual clock and a
step-time model fitted to measurements of the real engine (`step_time`, `measure`), at scales the
machine cannot serve. Both report per-request job completion time (JCT) and time to first token.
"""
