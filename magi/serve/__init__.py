"""``magi serve``: MAGI-1 behind an HTTP API (python -m magi.serve; docs/SERVE.md).

- ``app``: the FastAPI app (``create_app``): validation, the job queue, live streaming; no model;
- ``store``: the SQLite job table and the jobs' files, shared with the worker;
- ``worker``: the one process that loads the pipeline and runs the jobs in order;
- ``__main__``: the command line: starts and supervises the worker, serves the app with uvicorn.

Nothing is imported here, so the worker needs neither FastAPI nor uvicorn.
"""
