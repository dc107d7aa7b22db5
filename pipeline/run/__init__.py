"""The driver: one scoring run from the command line's configuration to a published, checked result.

Owns: the run's lifecycle (``lifecycle``: lock, prepare, execute, finalize, aggregate, publish,
drift, report), preparing and finalizing a run (``scoring``), the no-op check (``uptodate``), the
lock (``run_lock``), run checks (``run_check``), cluster profiles (``cluster``), progress events
(``progress``), interrupts (``interrupt``), early validation (``validate``) and the full-size
rehearsal (``rehearsal``). Runs in the driver process only; what runs on workers is
``pipeline.worker``. May import every other layer of ``pipeline``; nothing outside ``jobs``
imports it.
"""
